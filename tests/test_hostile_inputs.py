"""Hostile or careless inputs (issue 17): each is refused with an `FxCompressError` that names
the fix, or simply works; none leaks a raw exception, hangs, or is called an internal error."""

import os
import sys
import threading

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress import FxCompressError, cli
from fxcompress.capture import capture

ex = sys.modules["fxcompress.export"]  # the module; `fxcompress.export` is the function
X = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(scope="module")
def compiled():
    return fxcompress.compile(MLP().eval(), (X,), tolerance=0.05)


# 1 ------------------------------------------------------------------------------------------
def test_nan_or_inf_weights_are_named():
    m = MLP()
    with torch.no_grad():
        m.fc1.weight[0, :3] = float("nan")
    with pytest.raises(FxCompressError, match=r"weight 'fc1\.weight' holds 3 NaN values; "
                                              r".*fix the training run or load the right"):
        fxcompress.compile(m, (X,))
    m = MLP()
    with torch.no_grad():
        m.fc2.bias[1] = float("inf")
    with pytest.raises(FxCompressError, match=r"'fc2\.bias' holds 1 infinite values"):
        fxcompress.compile(m, (X,))

    class Masked(MLP):  # a causal mask of -inf kept as a buffer is legitimate
        def __init__(self):
            super().__init__()
            self.register_buffer("mask", torch.full((10, 10), float("-inf")).triu(1))

        def forward(self, x):
            return super().forward(x) @ self.mask.clamp(min=-1e4)

    capture(Masked(), (X,))


# 2 ------------------------------------------------------------------------------------------
def test_nan_or_inf_in_the_example_inputs():
    x = X.clone()
    x[0, :2] = float("nan")
    with pytest.raises(FxCompressError, match=r"example input 0 holds 2 NaN .*nan_to_num"):
        fxcompress.compile(MLP(), (x,))
    x = X.clone()
    x[3, 5] = float("inf")
    with pytest.raises(FxCompressError, match=r"example input 0 holds 1 \+infinite"):
        fxcompress.compile(MLP(), (x,))

    class Attn(nn.Module):  # -inf in an additive attention mask is allowed
        def forward(self, x, mask):
            return torch.softmax(x @ x.transpose(-1, -2) + mask, dim=-1)

    mask = torch.full((4, 4), float("-inf")).triu(1)
    capture(Attn(), (torch.randn(2, 4, 8), mask))


# 3 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, name", [(torch.float16, "float16"),
                                         (torch.bfloat16, "bfloat16")])
def test_low_precision_models_are_refused_with_the_fix(dtype, name):
    with pytest.raises(FxCompressError, match=rf"weights are {name} \(parameter 'fc1\.weight'\)"
                                              r".*compile model\.float\(\)"):
        fxcompress.compile(MLP().to(dtype), (X.to(dtype),))


# 4 ------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore")
def test_torch_ao_quantized_model_is_refused():
    q = torch.ao.quantization.quantize_dynamic(MLP(), {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(FxCompressError, match=r"already quantized by torch\.ao.*float model"):
        fxcompress.compile(q, (X,))


# 5 ------------------------------------------------------------------------------------------
def test_model_that_cannot_be_deep_copied_compiles_and_is_left_untouched():
    m = MLP().train()
    m.lock = threading.Lock()  # deepcopy: "cannot pickle '_thread.lock' object"
    before = {k: v.clone() for k, v in m.state_dict().items()}
    small = fxcompress.compile(m, (X,), tolerance=0.05)
    assert m.training and m.fc1.training  # the training flags came back
    assert isinstance(m.lock, type(threading.Lock()))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    ptrs = {p.data_ptr() for p in m.parameters()}
    assert not ptrs & {t.data_ptr() for t in small.state_dict().values()}
    with torch.no_grad():
        y, ref = small(X), m.eval()(X)
    assert float((y - ref).norm() / ref.norm()) < 0.05


# 6 ------------------------------------------------------------------------------------------
def test_two_compiles_in_two_threads_both_succeed():
    results: dict[int, object] = {}

    def run(i):
        try:
            results[i] = fxcompress.compile(MLP().eval(), (X,), tolerance=0.05)
        except Exception as e:  # noqa: BLE001 - reported below
            results[i] = e

    workers = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert all(isinstance(results.get(i), torch.fx.GraphModule) for i in range(2)), results


# 7 ------------------------------------------------------------------------------------------
def test_integer_output_is_said_to_be_not_floating_point():
    class Argmax(MLP):
        def forward(self, x):
            return super().forward(x).argmax(-1)

    with pytest.raises(FxCompressError, match=r"output is not floating point \(int64\).*logits"
                       ) as info:
        fxcompress.compile(Argmax(), (X,))
    assert "calibration inputs" not in str(info.value)


def test_keyword_only_forward_is_told_how_to_pass_inputs():
    class KwOnly(MLP):
        def forward(self, *, x):
            return super().forward(x)

    with pytest.raises(FxCompressError, match=r"keyword-only input\(s\) \(x\).*positionally"
                       ) as info:
        fxcompress.compile(KwOnly(), (X,))
    assert "control flow" not in str(info.value)

    class Positional(nn.Module):  # the workaround the message describes
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x=x)

    fxcompress.compile(Positional(KwOnly()), (X,), tolerance=0.05)
    with pytest.raises(FxCompressError, match=r"forward takes \(x\) but example_inputs holds 2"):
        fxcompress.compile(MLP(), (X, X))


# 8 ------------------------------------------------------------------------------------------
def test_export_with_inputs_of_the_wrong_shape(compiled, tmp_path):
    with pytest.raises(FxCompressError, match=r"example inputs of shape \(3, 7\) do not fit the "
                       r"compiled model \(it was compiled for inputs like \(N, 64\)\); pass "
                       r"inputs of the shape you compiled with"):
        fxcompress.export(compiled, (torch.randn(3, 7),), tmp_path / "m.pt2")
    with pytest.raises(FxCompressError, match=r"dtype float64 \(compiled for float32\)"):
        fxcompress.export(compiled, (X.double(),), tmp_path / "m.pt2")
    assert list(tmp_path.iterdir()) == []


# 9 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-1, 0, float("nan"), float("inf"), "0.01", True])
def test_export_check_tolerance_is_validated(compiled, tmp_path, bad):
    with pytest.raises(FxCompressError, match="check_tolerance"):
        fxcompress.export(compiled, (X,), tmp_path / "m.pt2", check_tolerance=bad)
    assert list(tmp_path.iterdir()) == []


# 10 -----------------------------------------------------------------------------------------
def test_unwritable_outputs_are_refused_before_compiling(compiled, tmp_path, monkeypatch,
                                                         capsys):
    torch.export.save(torch.export.export(MLP().eval(), (X,)), tmp_path / "model.pt2")
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "adir.pt2").mkdir()
    monkeypatch.chdir(tmp_path)
    for out, message in [("afile/out.pt2", "is a file, not a folder"),
                         ("adir.pt2", "is a folder; give a file name")]:
        before = sorted(p.name for p in tmp_path.iterdir())
        assert cli.main(["compile", "model.pt2", "-o", out]) == 2
        err = capsys.readouterr().err
        assert message in err and "internal error" not in err
        assert "compiling" not in err  # refused before the compile started
        assert sorted(p.name for p in tmp_path.iterdir()) == before
        with pytest.raises(FxCompressError, match=message):
            fxcompress.export(compiled, (X,), out)


def test_read_only_folder_is_refused(compiled, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: chmod 0o555 does not stop writes")
        with pytest.raises(FxCompressError, match="cannot write in the folder"):
            ex.preflight(ro / "m.pt2")
    finally:
        ro.chmod(0o755)


def test_read_only_file_system_is_refused(compiled, tmp_path, monkeypatch):
    # what a read-only mount does even to root: os.access says yes, creating a file fails
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(ex.tempfile, "mkstemp", read_only)
    with pytest.raises(FxCompressError, match=r"cannot write in the folder .*Read-only file"):
        fxcompress.export(compiled, (X,), tmp_path / "m.pt2")


def test_a_failed_write_names_the_path(compiled, tmp_path, monkeypatch):
    def deny(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ex.os, "replace", deny)
    with pytest.raises(FxCompressError, match=r"could not write .*m\.pt2.*Permission denied"):
        fxcompress.export(compiled, (X,), tmp_path / "m.pt2")
    assert list(tmp_path.iterdir()) == []  # the staging folder went too


# 11 -----------------------------------------------------------------------------------------
def test_staging_folders_of_killed_writes_are_cleaned_up(compiled, tmp_path):
    try:
        dead = int(open("/proc/sys/kernel/pid_max").read()) + 1  # no process can have it
    except OSError:
        dead = 2 ** 22 + 1
    tag = ex._host_tag()

    def staging(name, files=("m.pt2",), age=0.0):
        d = tmp_path / name
        d.mkdir()
        for f in files:
            (d / f).write_bytes(b"partial")
        if age:
            os.utime(d, (d.stat().st_atime - age, d.stat().st_mtime - age))
        return d

    stale = staging(f".m.pt2.{dead}-{tag}.abcd1234")  # its writer was SIGKILLed
    live = staging(f".m.pt2.{os.getpid()}-{tag}.efgh5678")  # a write in progress
    legacy = staging(".m.pt2.ijkl9012", age=2 * ex.STALE_STAGING_AGE_S)  # old naming, old
    fresh_legacy = staging(".m.pt2.mnop3456")  # old naming, recent: may still be writing
    stranger = staging(f".m.pt2.{dead}-{tag}.qrst7890", files=("notes.txt",))  # not ours
    fxcompress.export(compiled, (X,), tmp_path / "m.pt2")
    assert not stale.exists() and not legacy.exists()
    assert live.exists() and fresh_legacy.exists() and stranger.exists()
    assert (tmp_path / "m.pt2").is_file()
