"""Loading users' files safely: `.pt2` programs (`load_program`) and the reports stored in
`.pt2` / `.onnx` files (`read_report`).

A `.pt2` from a user is untrusted: `torch.export.load` unpickles the example inputs (retrying
with weights_only off when the safe load fails), unpickles weights, constants and custom
objects the archive's configs mark as pickled, loads AOTInductor shared libraries, evaluates
the graph's symbolic shapes with `sympy.sympify` and `exec`s its `guards_code`. torch looks
entries up ignoring letter case, Python's zipfile by exact name, and the two pick different
copies of a duplicated name. So before torch reads a file, `_check_archive` allows exactly the
entries `torch.export.save` writes (plus fxcompress's report), each once and unambiguous in
any letter case, reads the pickled example inputs through torch's own zip reader with
`weights_only=True`, and checks the graph's expressions, guards and operators; torch then
loads from the same open file with every `torch.load` forced to `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from threading import Lock
from typing import Any

import torch
from torch.export import ExportedProgram

from fxcompress.errors import FxCompressError

#: Name of the report inside a `.pt2` archive (an extra file) and in `.onnx` metadata.
REPORT_FILE = "fxcompress_report.json"

_RESAVE = ("re-save it with torch.export.save(torch.export.export(model, (x,)), 'model.pt2') "
           "from a model you trust")
#: Entries under the archive's root folder that `torch.export.save` writes for its one program
#: (named "model"), and the report fxcompress adds as an extra file.
_ENTRY_KINDS = (
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/model\.json|data/sample_inputs/model\.pt"
    r"|data/weights/model_weights_config\.json|data/weights/weight_[0-9]+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_[0-9]+"
    r"|extra/" + REPORT_FILE.replace(".", r"\.")
)
_REQUIRED_ENTRIES = ("archive_format", "archive_version", "models/model.json",
                     "data/sample_inputs/model.pt", "data/weights/model_weights_config.json",
                     "data/constants/model_constants_config.json")
#: Graph targets that are Python functions rather than operators (torch's symbolic-shape ops).
_BUILTIN_TARGETS = frozenset(
    [f"_operator.{n}" for n in ("getitem eq ne le ge lt gt neg pos mul add sub floordiv mod "
                                "pow truediv and_ or_ lshift rshift").split()]
    + ["math.trunc"] + [f"torch.sym_{n}" for n in "not int float ite max min sqrt".split()])
#: Operators that read or write files, and higher-order operators that call methods by name.
_REFUSED_OPS = frozenset(["aten::save", "aten::from_file", "debugprims::load_tensor"])
_REFUSED_HOPS = frozenset(["call_torchbind", "triton_kernel_wrapper_mutation",
                           "triton_kernel_wrapper_functional"])
#: Names `sympy.srepr` writes for the shape expressions torch serializes (`expr_str`), keyword
#: names included; anything else could make `sympy.sympify`'s `eval` run code.
_SYMPY_NAMES = frozenset((
    "Symbol Integer Rational Float Add Mul Pow Max Min Mod Abs floor ceiling sign Eq Ne Lt Le "
    "Gt Ge Equality Unequality StrictLessThan StrictGreaterThan LessThan GreaterThan And Or "
    "Not Xor Piecewise ExprCondPair true false oo zoo nan int_oo True False None "
    "FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv LShift "
    "RShift PowByNatural FloatPow FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator "
    "TruncToFloat TruncToInt RoundToInt RoundDecimal ToFloat Identity "
    "positive negative nonnegative nonpositive integer real finite infinite zero nonzero even "
    "odd rational commutative extended_real precision").split())


def load_program(path: str | Path) -> ExportedProgram:
    """Load a program saved with `torch.export.save` without running anything from the file:
    only tensors and the JSON graph are read, and nothing is unpickled beyond plain tensors.
    Raises `FxCompressError` for a missing file, a file that is not a plain saved program, or
    one that holds pickled objects, compiled code or entries torch could read ambiguously."""
    path = Path(path)
    with _open_user_file(path) as f:
        _check_archive(path, f)
        f.seek(0)
        try:
            with _weights_only_loads():
                return torch.export.load(f)
        except Exception as e:
            raise FxCompressError(
                f"{str(path)!r} could not be loaded as a saved program ({type(e).__name__}: "
                f"{str(e).strip()[:200]}); save it with "
                "torch.export.save(torch.export.export(model, (x,)), path)") from e


def read_report(path: str | Path) -> dict[str, Any] | None:
    """The report fxcompress stored in a `.pt2` or `.onnx` file, as plain data (None if the
    file carries none). `.pte` files carry no report."""
    path = Path(path)
    if not path.is_file():
        raise FxCompressError(f"{str(path)!r} does not exist; check the path")
    fmt = path.suffix.lower()
    if fmt == ".onnx":
        try:
            import onnx
        except ImportError as e:
            raise FxCompressError("reading an .onnx needs onnx: pip install "
                                  "'fxcompress[onnx]'") from e
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:
            raise FxCompressError(f"{str(path)!r} is not an ONNX model ({type(e).__name__}); "
                                  "give a file fxcompress export wrote") from e
        for prop in model.metadata_props:
            if prop.key == REPORT_FILE:
                return _parse_report(prop.value, path)
        return None
    if fmt == ".pte":
        raise FxCompressError(f"{str(path)!r} is a .pte, which keeps no report; export to .pt2 "
                              "or .onnx as well to keep one")
    with _open_user_file(path) as f:
        names = _check_archive(path, f)
        entry = next((n for n in names if n.endswith(f"/extra/{REPORT_FILE}")), None)
        if entry is None:
            return None
        f.seek(0)
        with zipfile.ZipFile(f) as z:
            raw = z.read(entry)
    return _parse_report(raw, path)


def _parse_report(raw: str | bytes, path: Path) -> dict[str, Any]:
    """A stored report as data (JSON only, never code); a clear error when it is damaged."""
    fix = "re-export the model with fxcompress to store a fresh report"
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
        raise FxCompressError(f"the report stored in {str(path)!r} is not valid JSON "
                              f"({type(e).__name__}: {str(e)[:100]}); {fix}") from None
    if not isinstance(data, dict):
        raise FxCompressError(f"the report stored in {str(path)!r} is a JSON "
                              f"{type(data).__name__}, not an object; {fix}")
    return data


@contextlib.contextmanager
def _open_user_file(path: Path) -> Iterator[Any]:
    """The user's file, opened once: the checks and the load read the same bytes even if the
    path is replaced in between."""
    if not path.exists():
        raise FxCompressError(f"{str(path)!r} does not exist; check the path")
    if not path.is_file():
        raise FxCompressError(f"{str(path)!r} is not a file")
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise FxCompressError(f"{str(path)!r} cannot be read ({e.strerror}); check its "
                              "permissions") from None
    with f:
        yield f



_FORCED_LOADS = Lock()  # loads in two threads must not restore each other's environment


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Every `torch.load` inside forced to `weights_only=True` (torch's documented switch,
    process-wide while it lasts): torch's own retry with weights_only off (for example inputs
    it cannot load safely) then fails instead of unpickling. A belt on top of
    `_check_archive`'s braces."""
    keys = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    with _FORCED_LOADS:
        saved = {k: os.environ.get(k) for k in keys}
        os.environ[keys[0]] = "1"
        os.environ.pop(keys[1], None)  # both set is an error in torch.load
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _check_archive(path: Path, f: Any) -> list[str]:
    """The entry names of a torch.export archive (open as `f`), after checking that it is laid
    out exactly as `torch.export.save` writes one and that torch will read nothing from it but
    tensors and plain data."""
    import re

    hint = ("save the model with torch.export.save(torch.export.export(model, (x,)), "
            "'model.pt2')")
    where = repr(str(path))
    f.seek(0)
    if not zipfile.is_zipfile(f):
        raise FxCompressError(f"{where} is not a saved program (not a torch.export "
                              f"archive); {hint}")
    f.seek(0)
    try:
        with zipfile.ZipFile(f) as z:
            names = [i.filename for i in z.infolist()]
            comment = z.comment
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise FxCompressError(f"{where} is a damaged zip file ({type(e).__name__}); "
                              f"{hint}") from None
    if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        raise FxCompressError(f"{where} is a pickle (torch.save output); fxcompress "
                              f"only loads programs safely, without unpickling: {hint}")
    if not names or comment:
        raise FxCompressError(f"{where} is a zip file but not a torch.export archive; {hint}")
    for n in names:
        parts = n.split("/")
        # the root folder is the saved file's name (any characters); the rest is checked below
        if (n.startswith("/") or "\\" in n or re.match(r"[A-Za-z]:", n)
                or any(p in ("", ".", "..") for p in parts)
                or re.search(r"[\x00-\x1f\x7f]", n)):
            raise FxCompressError(f"{where} has an entry with an unsafe name ({n!r}: an "
                                  "absolute path, '..', an empty part or control characters); "
                                  f"fxcompress loads only archives torch.export.save wrote: "
                                  f"{_RESAVE}")
    dup = next((n for n, c in Counter(names).items() if c > 1), None)
    if dup is not None:
        raise FxCompressError(f"{where} has {Counter(names)[dup]} entries named {dup!r}; torch "
                              "and a zip reader may each read a different one, so fxcompress "
                              f"refuses it: {_RESAVE}")
    by_case: dict[str, str] = {}
    for n in names:
        other = by_case.setdefault(n.lower(), n)
        if other != n:
            raise FxCompressError(f"{where} has entries whose names differ only in letter "
                                  f"case ({other!r}, {n!r}); torch looks entries up ignoring "
                                  "case, so which one it reads is ambiguous and fxcompress "
                                  f"refuses it: {_RESAVE}")
    root = names[0].split("/")[0] + "/"
    rel = [n[len(root):] if n.startswith(root) else None for n in names]
    if None in rel or "" in rel:
        raise FxCompressError(f"{where} has entries outside its root folder {root!r}; a "
                              f"torch.export archive keeps them all in one: {_RESAVE}")
    for r in rel:
        if re.fullmatch(r"data/(weights|constants)/[^/]*\.pt", r):
            raise FxCompressError(f"{where} uses the legacy pickled weight format, which "
                                  f"fxcompress does not load; re-save it: {hint}")
        if not re.fullmatch(_ENTRY_KINDS, r):
            raise FxCompressError(
                f"{where} holds {root}{r!r}, which torch.export.save does not write for a plain "
                "saved program (fxcompress loads no AOTInductor or ExecuTorch code, pickled "
                f"objects, other programs or extra files): {_RESAVE}")
    missing = [r for r in _REQUIRED_ENTRIES if r not in rel]
    if missing:
        raise FxCompressError(f"{where} is a zip file but not a torch.export archive (it "
                              f"lacks {missing[0]}); {hint}")
    # what torch's own zip reader sees, read with it: no room for the two readers to disagree
    f.seek(0)
    try:
        reader = torch._C.PyTorchFileReader(f)
        records = sorted(reader.get_all_records())
    except Exception as e:
        raise FxCompressError(f"{where} cannot be read by torch's archive reader "
                              f"({type(e).__name__}); {hint}") from None
    if records != sorted(rel):
        raise FxCompressError(f"{where} lists different entries to torch's archive reader than "
                              f"to a zip reader; fxcompress refuses it: {_RESAVE}")
    if reader.get_record("archive_format") != b"pt2":
        raise FxCompressError(f"{where} is a zip file but not a torch.export archive; {hint}")
    for kind, prefix in (("weights", "weight_"), ("constants", "tensor_")):
        name = f"data/{kind}/model_{kind}_config.json"
        config = _json_record(reader, name, where)
        config = config.get("config") if isinstance(config, dict) else None
        if not isinstance(config, dict):
            raise FxCompressError(f"{where} has a malformed {name}; {_RESAVE}")
        for fqn, meta in config.items():
            file = meta.get("path_name") if isinstance(meta, dict) else None
            if (not isinstance(meta, dict) or meta.get("use_pickle")
                    or not isinstance(file, str)
                    or not re.fullmatch(prefix + "[0-9]+", file)):
                raise FxCompressError(
                    f"{where} holds a pickled object ({fqn}); fxcompress only loads tensors, "
                    "without unpickling: save a program whose weights and constants are plain "
                    "tensors")
            if f"data/{kind}/{file}" not in rel:
                raise FxCompressError(f"{where} names {kind} file {file!r} that it does not "
                                      f"hold; {_RESAVE}")
    sample = reader.get_record("data/sample_inputs/model.pt")
    if sample:
        try:
            inputs = torch.load(io.BytesIO(sample), weights_only=True, map_location="cpu")
        except Exception as e:
            raise FxCompressError(f"{where} holds example inputs that are not plain tensors "
                                  f"({type(e).__name__}); fxcompress only loads tensors: "
                                  f"{hint}") from None
        if not isinstance(inputs, tuple | dict):
            raise FxCompressError(f"{where} holds example inputs of type "
                                  f"{type(inputs).__name__}, not (args, kwargs); {hint}")
    _check_graph(_json_record(reader, "models/model.json", where), where)
    return names


def _json_record(reader, name: str, where: str) -> Any:
    try:
        return json.loads(reader.get_record(name))
    except (ValueError, RecursionError) as e:
        raise FxCompressError(f"{where} has a damaged {name} ({type(e).__name__}); "
                              f"{_RESAVE}") from None


def _check_graph(program: Any, where: str) -> None:
    """The parts of a serialized program torch turns into code: shape expressions (parsed by
    `sympy.sympify`, an `eval`), `guards_code` (`exec`'d when the module is built) and the
    operators nodes call. Each must be what torch.export writes."""
    if not isinstance(program, dict):
        raise FxCompressError(f"{where} has a malformed models/model.json; {_RESAVE}")
    guards = program.get("guards_code") or []
    if not isinstance(guards, list) or not all(isinstance(g, str) and _safe_guard(g)
                                                for g in guards):
        raise FxCompressError(f"{where} holds input guards (guards_code) that are not plain "
                              f"shape comparisons; fxcompress does not run them: {_RESAVE}")
    stack: list[Any] = [program]
    while stack:  # iterative: a deep graph must not exhaust the recursion limit
        obj = stack.pop()
        if isinstance(obj, list):
            stack.extend(v for v in obj if isinstance(v, dict | list))
            continue
        for key, value in obj.items():
            if key == "expr_str" and not (isinstance(value, str) and _safe_sym_expr(value)):
                raise FxCompressError(f"{where} holds a shape expression that is not one "
                                      f"torch.export writes ({str(value)[:80]!r}); fxcompress "
                                      f"does not evaluate it: {_RESAVE}")
            if key in ("as_operator", "target") and not _allowed_op(value, node=key == "target"):
                raise FxCompressError(f"{where} calls {str(value)[:80]!r}, which is not an "
                                      "operator fxcompress runs (it allows torch operators "
                                      f"that do not touch files): {_RESAVE}")
            if isinstance(value, dict | list):
                stack.append(value)


def _safe_sym_expr(expr: str) -> bool:
    """`expr` is made of sympy constructors, numbers and symbol names only, as `sympy.srepr`
    writes them: no attribute access, no other names, no strings that sympy would parse."""
    import re

    token = re.compile(r"\s*(?:([A-Za-z_][A-Za-z0-9_]*)|'([A-Za-z_][A-Za-z0-9_]*|[-+]?[0-9]+"
                       r"(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)'|([0-9]+)|([(),=\-]))")
    pos = 0
    if len(expr) > 100_000:
        return False
    while pos < len(expr.rstrip()):
        m = token.match(expr, pos)
        if m is None or (m.group(1) is not None and m.group(1) not in _SYMPY_NAMES):
            return False
        pos = m.end()
    return True


def _safe_guard(code: str) -> bool:
    """`code` is a comparison of input sizes, as torch.export writes guards: arithmetic on
    `L['x'].size()[0]`-style terms, numbers and a few math functions, nothing else."""
    import ast

    try:
        tree = ast.parse(code, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    math_names = {"floor", "ceil", "trunc", "sqrt", "isnan", "isinf", "inf", "nan", "log2"}
    ops = (ast.Expression, ast.Compare, ast.BoolOp, ast.UnaryOp, ast.BinOp, ast.Load,
           ast.cmpop, ast.boolop, ast.unaryop, ast.operator)
    for node in ast.walk(tree):
        if isinstance(node, ops):
            continue
        if isinstance(node, ast.Constant):
            v = node.value
            if not (isinstance(v, bool | int | float) or v is None or isinstance(v, str)
                    and v.isidentifier()):
                return False
        elif isinstance(node, ast.Name):
            if node.id not in {"L", "math", "abs", "max", "min", "int", "float", "round"}:
                return False
        elif isinstance(node, ast.Attribute):
            if not (isinstance(node.value, ast.Name) and node.value.id == "math"
                    and node.attr in math_names or not isinstance(node.value, ast.Name)
                    and node.attr in {"size", "stride", "storage_offset", "dim"}):
                return False
        elif isinstance(node, ast.Subscript):
            if not isinstance(node.slice, ast.Constant):
                return False
        elif isinstance(node, ast.Call):
            if node.keywords:
                return False
        else:
            return False
    return True


def _allowed_op(name: Any, node: bool) -> bool:
    """`name` resolves to a torch operator (or, for a node, one of torch's symbolic-shape
    functions), as torch's deserializer would resolve it, and not one that touches files."""
    import re

    if not isinstance(name, str):
        return False
    if node and name in _BUILTIN_TARGETS:
        return True
    parts = name.split(".")
    if not re.fullmatch(r"torch\.ops(\.[A-Za-z_][A-Za-z0-9_]*){2,3}", name) or any(
            p.startswith("__") for p in parts[2:3] + parts[4:]):  # e.g. aten.__and__.Tensor
        return False
    target: Any = torch.ops
    try:
        for part in parts[2:]:
            target = getattr(target, part)
    except Exception:  # noqa: BLE001 - an unknown operator: torch could not run it either
        return False
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name not in _REFUSED_OPS
    if isinstance(target, torch._ops.HigherOrderOperator):
        return target.name() not in _REFUSED_HOPS
    return False


__all__ = ["load_program", "read_report", "REPORT_FILE"]
