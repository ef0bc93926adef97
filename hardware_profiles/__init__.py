"""Hardware profiles: the targets, as data.

A profile is a TOML file that says what a target runs and how fast: its backend and how a model
is lowered to it, which techniques it can run, peak throughput per precision and memory
bandwidth (for a roofline latency estimate), how it represents int8 and on which ops, which ops
run binary weights, palette sizes for weight sharing, channel alignment and memory budgets.
The planner only asks a profile questions (`supports`, `latency`); no code branches on a
profile's name.

Built-in profiles live beside this file; `load_profile` also takes a path to a user's file.
Every field is validated on load, and an error names the field and the fix.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fxcompress.errors import FxCompressError


def known_techniques() -> tuple[str, ...]:
    """Every technique fxcompress knows: those registered by `passes/<technique>/`, in pass
    order. A profile lists the subset its target can run. (Also `TECHNIQUES`.)"""
    import fxcompress.passes  # noqa: F401  (registers the techniques)
    from fxcompress.technique import REGISTRY

    return tuple(t.name for t in sorted(REGISTRY.values(), key=lambda t: t.order))


def __getattr__(name: str):
    # `TECHNIQUES` is the registry's names, read when asked: a new technique folder is enough
    if name == "TECHNIQUES":
        return known_techniques()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: Precisions a profile can give throughput for (GOP/s, one multiply-accumulate = 2 ops).
PRECISIONS = ("fp32", "fp16", "int8", "binary")
#: stored formats that are a float precision (a layer stored so computes in it, no decode)
FLOAT_FORMATS = ("fp32", "fp16")
#: bytes one element takes in each precision / stored format ("shared": decoded to fp32)
BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "int8": 1, "binary": 0.125, "shared": 4}
OBJECTIVES = ("latency", "size")
INT8_ACTIVATIONS = ("static", "dynamic", "none")
# How int8 is written into the graph: quantize/dequantize ops in the pattern ExecuTorch and ONNX
# Runtime fuse into int8 kernels ("qdq"); int8 matmul kernels that run fast in eager PyTorch and
# Inductor on x86 ("int_mm"); or int8 storage dequantized to the compute dtype ("dequant").
INT8_REPRESENTATIONS = ("qdq", "int_mm", "dequant")
# The integer type of quantized activations in the "qdq" form: XNNPACK and ONNX Runtime read
# signed int8; x86's oneDNN int8 GEMM (VNNI's vpdpbusd multiplies u8 by s8) wants unsigned
# activations, and falls back to a reference kernel 4000x slower for signed ones (measured).
INT8_ACTIVATION_DTYPES = ("int8", "uint8")
OP_TYPES = ("linear", "conv2d", "embedding")
EXPORT_FORMATS = (".pt2", ".pte", ".onnx", ".mlpackage")
#: The writers of each format: the first is the default; a profile's ``[backend] writer`` picks
#: another for its own `export_format` (the toolchain of its target reads that flavour).
WRITERS = {".pt2": ("torch.export",), ".pte": ("executorch", "cortex-m"),
           ".onnx": ("onnxruntime", "qonnx", "tensorrt"), ".mlpackage": ("coreml",)}


@dataclass(frozen=True)
class Profile:
    """A validated hardware profile. Build one with `load_profile` or `Profile.from_dict`."""

    name: str  # the profile's name, as `list_profiles` shows it
    description: str  # one line: the target device class
    runtime: str  # what runs the model on the target, e.g. "executorch-xnnpack"
    export_format: str  # the deployable file `fxcompress export` writes by default
    delegate: str | None  # ExecuTorch partitioner for `.pte` files, e.g. "xnnpack"
    compute_dtype: str  # precision an uncompressed layer runs in on this target
    objective: str  # default objective: "latency" or "size"
    techniques: tuple[str, ...]  # techniques this target can run
    alignment: int  # ranks and channel counts are rounded to a multiple of this
    peak_gops: dict[str, float]  # peak throughput per precision, GOP/s
    bandwidth_gbs: float  # memory bandwidth, GB/s
    op_overhead_us: float  # fixed cost of launching one operator, microseconds
    int8_activations: str  # "static", "dynamic" or "none" (weight-only)
    int8_representation: str  # see INT8_REPRESENTATIONS
    int8_ops: tuple[str, ...]  # op types int8 applies to ("linear", "conv2d", "embedding")
    weight_only_speedup: bool  # does weight-only int8 run faster (less weight traffic)?
    int8_required: bool  # the target runs int8 only: every layer that can be int8 must be
    share_bits: tuple[int, ...]  # palette index widths the target decodes natively
    binary_activations: bool  # does the target run binary activations (XNOR-popcount)?
    weight_budget_bytes: int | None  # flash / storage for weights, if bounded
    activation_budget_bytes: int | None  # RAM for activations, if bounded
    measure: bool  # throughput numbers to be replaced by host micro-benchmarks
    sources: dict[str, str] = field(default_factory=dict)  # where each number comes from
    int8_activation_dtype: str = "int8"  # see INT8_ACTIVATION_DTYPES
    # instruction sets of the target CPU that decide int8 arithmetic (x86: /proc/cpuinfo's
    # names, e.g. "avx512_vnni"); empty where the target is not an x86 CPU
    isa: tuple[str, ...] = ()
    # int8 weights use [-(2^(b-1) - 1), 2^(b-1) - 1]: 8, or 7 where the target's u8 x s8
    # kernels add pairs of products in 16 bits (x86 without VNNI) and full-range weights would
    # saturate them
    int8_weight_bits: int = 8
    # narrower widths int8 layers may also take (`[int8] packed_bits`, e.g. [4]): the codes
    # are per-channel symmetric in that width, stored packed in the file and unpacked to int8
    # in the program before the int8 kernel (a runtime that reads int8 weights only)
    int8_packed_bits: tuple[int, ...] = ()
    # op types the target runs with binary weights (FINN-style: matmuls and convolutions)
    binary_ops: tuple[str, ...] = ("linear", "conv2d")
    # whether the runtime has dynamically quantized grouped / depthwise convolutions (XNNPACK
    # has none: such a conv stays weight-only int8 under dynamic activations)
    int8_dynamic_grouped_conv: bool = False
    # the writer of `export_format` this target's toolchain reads (see WRITERS), e.g. "qonnx"
    # for FINN's ONNX dialect; the format's default writer where the profile names none
    writer: str = ""
    # whether the target decodes palettes whose entries are int8 with a scale per table
    # (`[share] lut_int8`); None: where the profile runs int8
    share_lut_int8: bool | None = None
    # whether the runtime fuses element-wise ops into the kernel before them (Inductor does:
    # an int8 embedding's gather, convert and rescale run as one kernel that writes the float
    # rows once); where it does not, each such op reads and writes a full-width tensor
    fuses_elementwise: bool = False
    # group-wise low-bit weights (`[intx]`): the widths the target's kernels run, the input
    # columns per scale, the precision it keeps scales in, and the ops it runs them on; the
    # activations are 8-bit dynamic per token (the only form built)
    intx_bits: tuple[int, ...] = ()
    intx_group_size: int = 32
    intx_scale_dtype: str = "fp32"
    intx_ops: tuple[str, ...] = ("linear",)
    # how intx layers take their input: "dynamic" (8-bit per token, XNNPACK's qd8 x qb4w) or
    # "none" (weight-only: the codes dequantized to the compute dtype before the float op)
    intx_activations: str = "dynamic"
    # single weights zeroed and stored sparse (`[sparsity]`): the mask patterns the target
    # reads ("unstructured", "2:4", ...), the fractions an unstructured mask zeroes, the palette
    # widths its kept values may take, and what the runtime's sparse kernels measured against
    # dense per pattern (dense time / sparse time; a record: every sparse layer is costed as
    # decoded to dense, the only form fxcompress writes)
    sparsity_patterns: tuple[str, ...] = ()
    sparsity_levels: tuple[float, ...] = ()
    sparsity_value_bits: tuple[int, ...] = ()
    sparsity_speedup: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        # a Profile built in code (`dataclasses.replace`, `Profile(...)`) gets the same checks
        # of its numbers as a file: a NaN or infinite cost makes every plan's gain NaN
        _check_numbers(repr(self.name), {
            **{f"throughput.{p}": (v, f"Profile.peak_gops[{p!r}]")
               for p, v in self.peak_gops.items()},
            "throughput.bandwidth_gbs": (self.bandwidth_gbs, "Profile.bandwidth_gbs"),
            "throughput.op_overhead_us": (self.op_overhead_us, "Profile.op_overhead_us"),
            "planner.alignment": (self.alignment, "Profile.alignment"),
            "memory.weight_budget_bytes": (self.weight_budget_bytes,
                                           "Profile.weight_budget_bytes"),
            "memory.activation_budget_bytes": (self.activation_budget_bytes,
                                               "Profile.activation_budget_bytes"),
        })
        if self.share_lut_int8 is None:
            object.__setattr__(self, "share_lut_int8", "int8" in self.techniques)
        if self.compute_dtype not in self.peak_gops:
            raise _err(repr(self.name), f"throughput.{self.compute_dtype}", "is missing",
                       "give the throughput of the compute dtype (Profile.peak_gops)")

    # --- questions the planner asks -------------------------------------------------------
    def allows(self, technique: str) -> bool:
        """Whether this target can run `technique` at all."""
        return technique in self.techniques

    def supports(self, op: str, fmt: str) -> bool:
        """Whether this target runs layers of type `op` ("linear", "conv2d", "embedding") in
        format `fmt` ("fp32", "fp16", "int8", "binary", "shared", "intx", "sparse")."""
        if fmt == self.compute_dtype or fmt == "fp32":
            return True
        if fmt == "int8":
            return self.allows("int8") and op in self.int8_ops
        if fmt == "binary":
            return self.allows("binary") and op in self.binary_ops
        if fmt == "shared":
            return self.allows("share")
        if fmt == "intx":
            return self.allows("intx") and op in self.intx_ops
        if fmt == "sparse":
            return self.allows("sparse") and bool(self.sparsity_patterns) \
                and op in ("linear", "conv2d")
        return fmt in self.peak_gops

    def requires(self, fmt: str) -> bool:
        """Whether the target runs only `fmt` on the layers that can run it (no float
        kernels: `[int8] required = true`)."""
        return fmt == "int8" and self.int8_required

    def precision_of(self, fmt: str) -> str:
        """The precision whose throughput a layer stored in `fmt` computes at."""
        if fmt == "int8" and self.int8_activations != "none":
            return "int8"
        if fmt == "binary" and self.binary_activations:
            return "binary"
        if fmt == "intx" and "int8" in self.peak_gops and self.intx_activations == "dynamic":
            return "int8"  # int8 activations (dynamic per token) x low-bit weights
        return self.compute_dtype

    def activation_bytes(self, fmt: str) -> int:
        """Bytes per activation element of a layer stored in `fmt`, for the activation budget:
        1 where it computes in int8, else 4 (binary activations are counted as the float
        outputs their popcounts are scaled into)."""
        return 1 if self.precision_of(fmt) == "int8" else 4

    def latency(self, macs: float, weight_bytes: float, activation_bytes: float, fmt: str,
                n_ops: int = 1) -> float:
        """Roofline latency estimate in seconds of one layer: the slower of compute
        (2·MACs over the peak of the format's precision) and memory traffic (weights plus
        activations over bandwidth), plus a fixed per-operator overhead."""
        peak = self.peak_gops[self.precision_of(fmt)] * 1e9
        compute = 2.0 * macs / peak
        memory = (weight_bytes + activation_bytes) / (self.bandwidth_gbs * 1e9)
        return max(compute, memory) + n_ops * self.op_overhead_us * 1e-6

    def align(self, n: int) -> int:
        """`n` rounded up to the target's channel alignment (never above what it was rounded
        from by more than one alignment step, never below the alignment)."""
        a = self.alignment
        return max(a, int(math.ceil(n / a)) * a)

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> Profile:
        """Validate the parsed TOML `data` and build a profile; errors name the field."""
        return _parse(data, source)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for reports and JSON."""
        return {
            "name": self.name, "runtime": self.runtime, "objective": self.objective,
            "techniques": list(self.techniques), "compute_dtype": self.compute_dtype,
            "peak_gops": dict(self.peak_gops), "bandwidth_gbs": self.bandwidth_gbs,
            "int8_activations": self.int8_activations,
            "int8_representation": self.int8_representation,
            "int8_activation_dtype": self.int8_activation_dtype,
            "int8_weight_bits": self.int8_weight_bits,
            "int8_packed_bits": list(self.int8_packed_bits), "isa": list(self.isa),
            "fuses_elementwise": self.fuses_elementwise, "writer": self.writer,
            "intx_bits": list(self.intx_bits), "intx_group_size": self.intx_group_size,
            "intx_activations": self.intx_activations,
            "sparsity_patterns": list(self.sparsity_patterns),
            "sparsity_levels": list(self.sparsity_levels),
            "sparsity_value_bits": list(self.sparsity_value_bits),
            "measured_on_host": self.measure, "alignment": self.alignment,
            "weight_budget_bytes": self.weight_budget_bytes,
            "activation_budget_bytes": self.activation_budget_bytes,
        }


# --- the schema ---------------------------------------------------------------------------
# section -> field -> (type, required). One table says what a profile file may contain, so the
# loader, its error messages and the docs cannot disagree.
_SCHEMA: dict[str, dict[str, tuple[type | tuple[type, ...], bool]]] = {
    "": {"name": (str, True), "description": (str, True)},
    "backend": {"runtime": (str, True), "export_format": (str, True), "delegate": (str, False),
                "compute_dtype": (str, True), "fuses_elementwise": (bool, False),
                "writer": (str, False)},
    "planner": {"objective": (str, True), "techniques": (list, True), "alignment": (int, True)},
    "throughput": {"fp32": ((int, float), True), "fp16": ((int, float), False),
                   "int8": ((int, float), False), "binary": ((int, float), False),
                   "bandwidth_gbs": ((int, float), True), "op_overhead_us": ((int, float), True),
                   "measure": (bool, False)},
    "target": {"isa": ((list, str), False)},
    "int8": {"activations": (str, False), "representation": (str, False), "ops": (list, False),
             "activation_dtype": (str, False), "weight_bits": (int, False),
             "packed_bits": (list, False), "weight_only_speedup": (bool, False),
             "required": (bool, False), "dynamic_grouped_conv": (bool, False)},
    "share": {"bits": (list, False), "lut_int8": (bool, False)},
    "intx": {"bits": (list, False), "group_size": (int, False), "activations": (str, False),
             "scale_dtype": (str, False), "ops": (list, False), "symmetric": (bool, False)},
    "sparsity": {"patterns": (list, False), "levels": (list, False), "value_bits": (list, False),
                 "speedup": (dict, False)},
    "binary": {"activations": (bool, False), "ops": (list, False)},
    "memory": {"weight_budget_bytes": (int, False), "activation_budget_bytes": (int, False)},
    "sources": {},  # free-form: field name -> citation
}


def _err(source: str, fld: str, problem: str, fix: str) -> FxCompressError:
    return FxCompressError(f"profile {source}: field '{fld}' {problem}; {fix}")


# field -> (smallest allowed value, whether it is excluded, whole numbers only, the fix). Every
# number of a profile is finite: TOML spells nan and inf, and one NaN or infinite cost makes
# the planner's gains NaN.
_NUMBERS: dict[str, tuple[float, bool, bool, str]] = {
    **{f"throughput.{p}": (0.0, True, False, "give the peak throughput in GOP/s, a finite "
                           "number > 0 (e.g. 100)") for p in PRECISIONS},
    "throughput.bandwidth_gbs": (0.0, True, False, "give the memory bandwidth in GB/s, a finite "
                                 "number > 0 (e.g. 20)"),
    "throughput.op_overhead_us": (0.0, False, False, "give the per-operator overhead in "
                                  "microseconds, a finite number >= 0 (e.g. 5)"),
    "planner.alignment": (1, False, True, "give a whole number, 1 or more (1: no alignment)"),
    **{f"memory.{b}": (0, True, True, "give a whole number of bytes > 0, or leave the field "
                       "out for no limit") for b in ("weight_budget_bytes",
                                                     "activation_budget_bytes")},
}


def _check_numbers(source: str, values: dict[str, tuple[Any, str | None]]) -> None:
    """Each value (None: absent) is a finite number within its field's range (`_NUMBERS`);
    the error names the field, the attribute it was given as (if any) and the fix."""
    for fld, (value, attr) in values.items():
        if value is None and fld.startswith("memory."):
            continue
        if fld not in _NUMBERS:
            raise _err(source, fld, "is not a known field",
                       f"throughput is given for {', '.join(PRECISIONS)}")
        lowest, strict, whole, fix = _NUMBERS[fld]
        where = f"field '{fld}'" + ("" if attr is None else f" ({attr})")

        def bad(problem: str, where=where, fix=fix) -> FxCompressError:
            return FxCompressError(f"profile {source}: {where} {problem}; {fix}")

        want = int if whole else int | float
        if isinstance(value, bool) or not isinstance(value, want):
            raise bad(f"has type {type(value).__name__}")
        try:
            v = float(value)
        except OverflowError:
            raise bad("is too large") from None
        if math.isnan(v) or math.isinf(v):
            raise bad(f"is {v}")
        if v < lowest or (strict and v == lowest):
            raise bad(f"is {value}")


def _one_of(source: str, fld: str, value: Any, allowed: tuple) -> Any:
    if value not in allowed:
        raise _err(source, fld, f"is {value!r}", f"use one of {', '.join(map(repr, allowed))}")
    return value


def _parse(data: dict[str, Any], source: str) -> Profile:
    if not isinstance(data, dict):
        raise FxCompressError(f"profile {source}: expected a TOML table at the top level")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in _SCHEMA or key == "":
                raise _err(source, key, "is not a known section",
                           f"known sections: {', '.join(s for s in _SCHEMA if s)}")
            if key == "sources":
                flat["sources"] = {str(k): str(v) for k, v in value.items()}
                continue
            for sub, subval in value.items():
                if sub not in _SCHEMA[key]:
                    raise _err(source, f"{key}.{sub}", "is not a known field",
                               f"known fields of [{key}]: {', '.join(_SCHEMA[key])}")
                flat[f"{key}.{sub}"] = subval
        else:
            if key not in _SCHEMA[""]:
                raise _err(source, key, "is not a known top-level field",
                           "put it in its section (e.g. [throughput]) or remove it")
            flat[key] = value
    for section, fields in _SCHEMA.items():
        for fld, (typ, required) in fields.items():
            name = f"{section}.{fld}" if section else fld
            if name not in flat:
                if required:
                    raise _err(source, name, "is missing", "add it to the profile file")
                continue
            value = flat[name]
            if isinstance(value, bool) and typ in (int, (int, float)):
                raise _err(source, name, f"is a boolean ({value})", "give a number")
            if not isinstance(value, typ):
                want = (typ.__name__ if isinstance(typ, type) else "number"
                        if typ == (int, float) else " or ".join(t.__name__ for t in typ))
                raise _err(source, name, f"has type {type(value).__name__}", f"give a {want}")

    techniques = tuple(flat["planner.techniques"])
    for t in techniques:
        _one_of(source, "planner.techniques", t, known_techniques())
    _check_numbers(source, {k: (flat[k], None) for k in _NUMBERS if k in flat})
    peak = {p: float(flat[f"throughput.{p}"]) for p in PRECISIONS if f"throughput.{p}" in flat}
    compute_dtype = _one_of(source, "backend.compute_dtype", flat["backend.compute_dtype"],
                            ("fp32", "fp16"))
    if compute_dtype not in peak:
        raise _err(source, f"throughput.{compute_dtype}", "is missing",
                   "give the throughput of the compute dtype")
    if "int8" in techniques and "int8" not in peak and flat.get("int8.activations") != "none":
        raise _err(source, "throughput.int8", "is missing although int8 is in techniques",
                   "give int8 throughput, or set [int8] activations = \"none\"")
    binary_act = bool(flat.get("binary.activations", False))
    if binary_act and "binary" not in peak:
        raise _err(source, "throughput.binary", "is missing although binary activations are on",
                   "give binary throughput or set [binary] activations = false")
    alignment = flat["planner.alignment"]
    share_bits = tuple(flat.get("share.bits", [2, 4, 8] if "share" in techniques else []))
    for b in share_bits:
        if not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= 8:
            raise _err(source, "share.bits", f"contains {b!r}", "use whole numbers 1 to 8")
    int8_ops = tuple(flat.get("int8.ops", ["linear", "conv2d"]))
    for op in int8_ops:
        _one_of(source, "int8.ops", op, OP_TYPES)
    binary_ops = tuple(flat.get("binary.ops", ["linear", "conv2d"]))
    for op in binary_ops:
        _one_of(source, "binary.ops", op, ("linear", "conv2d"))
    intx = _intx_fields(source, flat, techniques, peak)
    sparsity = _sparsity_fields(source, flat, techniques)
    measure = bool(flat.get("throughput.measure", False))
    isa = flat.get("target.isa", [])
    if isinstance(isa, str):
        if isa != "host":
            raise _err(source, "target.isa", f"is {isa!r}",
                       "give a list of instruction sets (e.g. [\"avx2\", \"avx512_vnni\"]), "
                       "or \"host\" with [throughput] measure = true")
        if not measure:
            raise _err(source, "target.isa", "is \"host\" but the profile is not measured",
                       "set [throughput] measure = true, or list the target's instruction sets")
        isa = []  # read from the host when the profile is used (fxcompress.host)
    if not all(isinstance(f, str) and f for f in isa):
        raise _err(source, "target.isa", f"contains {isa!r}", "give instruction-set names")
    weight_bits = flat.get("int8.weight_bits", 8)
    if weight_bits not in (7, 8):
        raise _err(source, "int8.weight_bits", f"is {weight_bits!r}",
                   "use 8, or 7 for x86 CPUs without VNNI")
    packed_bits = _packed_bits(source, flat)
    return Profile(
        name=flat["name"],
        description=flat["description"],
        runtime=flat["backend.runtime"],
        export_format=_one_of(source, "backend.export_format", flat["backend.export_format"],
                              EXPORT_FORMATS),
        delegate=flat.get("backend.delegate"),
        fuses_elementwise=flat.get("backend.fuses_elementwise", False),
        compute_dtype=compute_dtype,
        objective=_one_of(source, "planner.objective", flat["planner.objective"], OBJECTIVES),
        techniques=techniques,
        alignment=alignment,
        peak_gops=peak,
        bandwidth_gbs=float(flat["throughput.bandwidth_gbs"]),
        op_overhead_us=float(flat["throughput.op_overhead_us"]),
        int8_activations=_one_of(source, "int8.activations",
                                 flat.get("int8.activations", "dynamic"), INT8_ACTIVATIONS),
        int8_representation=_one_of(source, "int8.representation",
                                    flat.get("int8.representation", "dequant"),
                                    INT8_REPRESENTATIONS),
        int8_ops=int8_ops,
        int8_activation_dtype=_one_of(source, "int8.activation_dtype",
                                      flat.get("int8.activation_dtype", "int8"),
                                      INT8_ACTIVATION_DTYPES),
        weight_only_speedup=bool(flat.get("int8.weight_only_speedup", False)),
        int8_required=bool(flat.get("int8.required", False)),
        binary_ops=binary_ops,
        share_lut_int8=flat.get("share.lut_int8"),
        int8_dynamic_grouped_conv=bool(flat.get("int8.dynamic_grouped_conv", False)),
        writer=_writer(source, flat),
        share_bits=share_bits,
        binary_activations=binary_act,
        weight_budget_bytes=flat.get("memory.weight_budget_bytes"),
        activation_budget_bytes=flat.get("memory.activation_budget_bytes"),
        measure=measure,
        sources=flat.get("sources", {}),
        isa=tuple(str(f).lower() for f in isa),
        int8_weight_bits=weight_bits,
        int8_packed_bits=packed_bits,
        **intx,
        **sparsity,
    )


#: the widths `[int8] packed_bits` may list: codes packed two per byte
PACKED_BITS = (4,)


def _packed_bits(source: str, flat: dict[str, Any]) -> tuple[int, ...]:
    """`[int8] packed_bits`, checked: widths in `PACKED_BITS`, on a profile whose int8 layers
    are ``qdq`` (the form that stores weights behind a ``dequantize_per_channel``)."""
    bits = flat.get("int8.packed_bits", [])
    for b in bits:
        if isinstance(b, bool) or b not in PACKED_BITS:
            raise _err(source, "int8.packed_bits", f"contains {b!r}",
                       f"list widths of {', '.join(map(str, PACKED_BITS))} (codes packed two "
                       "per byte), or use [intx] for group-wise low-bit weights")
    if bits and flat.get("int8.representation", "dequant") != "qdq":
        raise _err(source, "int8.packed_bits", "is set but [int8] representation is not \"qdq\"",
                   "packed int8 weights are unpacked before a qdq int8 layer: set "
                   "representation = \"qdq\", or remove packed_bits")
    return tuple(sorted(set(bits)))


def _writer(source: str, flat: dict[str, Any]) -> str:
    fmt = flat["backend.export_format"]
    allowed = WRITERS.get(fmt, ())
    return _one_of(source, "backend.writer", flat.get("backend.writer", allowed[0]), allowed)


def _intx_fields(source: str, flat: dict[str, Any], techniques: tuple[str, ...],
                 peak: dict[str, float]) -> dict[str, Any]:
    if "intx" not in techniques:
        return {}
    bits = flat.get("intx.bits", [4])
    if not bits or not all(isinstance(b, int) and not isinstance(b, bool) and 2 <= b <= 7
                           for b in bits):
        raise _err(source, "intx.bits", f"is {bits!r}", "give widths from 2 to 7, e.g. [4]")
    group = flat.get("intx.group_size", 32)
    if group < 2:
        raise _err(source, "intx.group_size", f"is {group!r}", "give 2 or more, e.g. 32")
    act = _one_of(source, "intx.activations", flat.get("intx.activations", "dynamic"),
                  ("dynamic", "none"))
    if act == "dynamic" and "int8" not in peak:
        raise _err(source, "throughput.int8", "is missing although intx is in techniques",
                   "give the int8 throughput its dynamic int8 activations compute at")
    if not flat.get("intx.symmetric", True):
        raise _err(source, "intx.symmetric", "is false",
                   "set it true: asymmetric group-wise codes (a zero point per group) are not "
                   "built; the runtime fxcompress writes them for (XNNPACK's qb4w kernel) reads "
                   "no zero points")
    ops = tuple(flat.get("intx.ops", ["linear"]))
    for op in ops:
        if op == "conv2d":
            # ExecuTorch's XNNPACK path quantizes convolutions dynamically with int8
            # per-channel weights only (executorch PR #10347); no runtime here reads 4-bit
            # group-wise convolution weights
            raise _err(source, "intx.ops", "lists \"conv2d\"",
                       "drop it: group-wise low-bit convolutions are not built (none of the "
                       "runtimes fxcompress writes files for runs them); convolutions get int8 or "
                       "palettes")
        _one_of(source, "intx.ops", op, ("linear", "embedding"))
    return {"intx_bits": tuple(bits), "intx_group_size": group,
            "intx_scale_dtype": _one_of(source, "intx.scale_dtype",
                                        flat.get("intx.scale_dtype", "fp32"),
                                        ("fp32", "bf16", "fp16")),
            "intx_ops": ops, "intx_activations": act}


def _sparsity_fields(source: str, flat: dict[str, Any], techniques: tuple[str, ...]
                     ) -> dict[str, Any]:
    from fxcompress.passes.sparse.masks import VALUE_BITS, nm_of

    given = [k for k in flat if k.startswith("sparsity.")]
    if "sparse" not in techniques:
        if given:
            raise _err(source, given[0], "is given but \"sparse\" is not in [planner] "
                       "techniques", "add \"sparse\" to the techniques or drop [sparsity]")
        return {}
    patterns = flat.get("sparsity.patterns", [])
    if not patterns:
        raise _err(source, "sparsity.patterns", "is missing or empty although sparse is in "
                   "techniques", "list the masks the target reads, e.g. [\"unstructured\"] "
                   "or [\"2:4\"]")
    for pt in patterns:
        try:
            if not isinstance(pt, str):
                raise ValueError(pt)
            nm_of(pt)
        except ValueError:
            raise _err(source, "sparsity.patterns", f"contains {pt!r}",
                       "use \"unstructured\" or \"N:M\" with N < M, e.g. \"2:4\"") from None
    levels = flat.get("sparsity.levels", [])
    if "unstructured" in patterns and not levels:
        raise _err(source, "sparsity.levels", "is missing although \"unstructured\" is a "
                   "pattern", "give the fractions zeroed, e.g. [0.5, 0.75, 0.9]")
    for lv in levels:
        if isinstance(lv, bool) or not isinstance(lv, (int, float)) or not 0 < lv < 1:
            raise _err(source, "sparsity.levels", f"contains {lv!r}",
                       "give fractions between 0 and 1 (exclusive), e.g. 0.75")
    vbits = flat.get("sparsity.value_bits", [])
    for b in vbits:
        if isinstance(b, bool) or b not in VALUE_BITS:
            raise _err(source, "sparsity.value_bits", f"contains {b!r}",
                       f"use palette widths that pack whole into bytes: {list(VALUE_BITS)}")
    speedup = flat.get("sparsity.speedup", {})
    for k, v in speedup.items():
        if k not in patterns or isinstance(v, bool) or not isinstance(v, (int, float)) \
                or not math.isfinite(v) or v <= 0:
            raise _err(source, f"sparsity.speedup.{k}", f"is {v!r}",
                       "give a listed pattern's measured dense time / sparse time (> 0)")
    return {"sparsity_patterns": tuple(patterns), "sparsity_levels": tuple(float(v) for v in
                                                                           levels),
            "sparsity_value_bits": tuple(vbits),
            "sparsity_speedup": {k: float(v) for k, v in speedup.items()}}


def _builtin_dir() -> Path:
    return Path(str(resources.files(__name__)))


def list_profiles() -> list[str]:
    """Names of the built-in profiles, sorted."""
    return sorted(p.stem for p in _builtin_dir().glob("*.toml"))


def load_profile(name_or_path: str | Path | Profile) -> Profile:
    """A built-in profile by name, a user's profile file by path, or a `Profile` as it is.

    Raises `FxCompressError` for an unknown name, a missing or malformed file, or a field that
    fails validation; the message names the field and the fix."""
    if isinstance(name_or_path, Profile):
        return name_or_path
    if not isinstance(name_or_path, str | Path):
        raise FxCompressError(
            f"profile must be a name, a path or a Profile, not {type(name_or_path).__name__}; "
            f"built-in names: {', '.join(list_profiles())}")
    text = str(name_or_path)
    path = Path(text)
    if path.suffix != ".toml" and "/" not in text and "\\" not in text:
        builtin = _builtin_dir() / f"{text}.toml"
        if not builtin.is_file():
            raise FxCompressError(
                f"unknown profile {text!r}; use one of {', '.join(list_profiles())}, "
                "or the path to a .toml profile file")
        path = builtin
    if not path.is_file():
        raise FxCompressError(f"profile file {text!r} does not exist; check the path, or use a "
                              f"built-in name: {', '.join(list_profiles())}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FxCompressError(f"profile file {text!r} is not valid TOML ({e}); fix the syntax "
                              "at the position named") from None
    return _parse(data, repr(text))


__all__ = ["Profile", "load_profile", "list_profiles", "TECHNIQUES", "PRECISIONS"]
