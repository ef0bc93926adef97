"""Block-by-block compilation (`fxcompress.blocks`): blocks read from safetensors shards chain
to the whole model, the same plan compiled block by block equals the whole-model compile, a run
killed halfway resumes to the same bytes, and bad checkpoints or folders are refused."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fxcompress
from fxcompress.blocks import MANIFEST, WORK, compile_blocks, load_blocks
from fxcompress.blocks.checkpoint import Checkpoint
from fxcompress.blocks.decoder import DecoderFamily
from fxcompress.errors import FxCompressError

pytest.importorskip("transformers", reason="the decoder blocks are built from transformers")

VOCAB = 128


def _save(kind: str, folder: Path, layers: int = 2) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls_cfg, cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                    "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    torch.manual_seed(0)
    cfg = cls_cfg(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, use_cache=False)
    model = cls(cfg).eval()
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="100KB")
    return model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    return folder, _save("llama", folder)


def _calibration() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (4, 16), generator=g) for _ in range(4)]


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_blocks_chain_to_the_whole_model(kind, tmp_path):
    model = _save(kind, tmp_path)
    ckpt = Checkpoint(tmp_path)
    assert len(ckpt.shards) > 1  # really sharded: blocks are read across files
    family = DecoderFamily(ckpt)
    assert family.names == ("embed", "layer.0", "layer.1", "head")
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        h = ids
        for name in family.names:
            h = family.block(name)(h)
        want = model(ids).logits
    assert _rel(h, want) < 1e-5
    assert sum(family.weight_bytes(n) for n in family.names) == ckpt.nbytes()
    # the embedding and the head in three row chunks: the chunks' embeddings sum to the
    # embedding exactly, their logits concatenate to the logits
    chunked = DecoderFamily(ckpt, vocab_chunks=3)
    assert chunked.names == ("embed.0", "embed.1", "embed.2", "layer.0", "layer.1",
                             "head.0", "head.1", "head.2")
    with torch.no_grad():
        h2 = ids
        for stage in chunked.stages:
            h2 = stage.join([chunked.block(b)(h2) for b in stage.blocks])
        emb = chunked.stages[0].join([chunked.block(b)(ids) for b in chunked.stages[0].blocks])
        assert torch.equal(emb, family.block("embed")(ids))
    assert _rel(h2, want) < 1e-5
    assert chunked.weight_bytes("embed.1") == family.weight_bytes("embed") * (85 - 42) // VOCAB
    with pytest.raises(FxCompressError, match="vocab_chunks"):
        DecoderFamily(ckpt, vocab_chunks=0)


def test_same_plan_block_by_block_equals_whole_model(llama, tmp_path):
    """Fitted on the original activations (sequential=False, as a whole-model compile fits
    every layer), GPTQ and AWQ included, the blocks give the whole-model compile's outputs."""
    folder, model = llama
    cal = _calibration()
    res = compile_blocks(folder, tmp_path / "out", calibration=cal, profile="mobile-arm",
                         tolerance=1.0, techniques=["intx"], sequential=False)
    assert all(b.applied.get("intx", 0) >= 4 for b in res.blocks if b.name.startswith("layer."))
    whole = fxcompress.compile(_Logits(model), (cal[0],), profile="mobile-arm",
                               calibration=[(c,) for c in cal], tolerance=1.0,
                               techniques=["intx"])
    applied = [la.applied for la in whole.meta["fxcompress_report"].layers]
    assert sum(a.startswith("intx") for a in applied) == sum(
        sum(b.applied.values()) for b in res.blocks)
    blocks = load_blocks(tmp_path / "out")
    ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want, fp32 = blocks(ids), whole(ids), model(ids).logits
    assert _rel(got, want) <= 1e-5
    assert _rel(want, fp32) > 1e-3  # the plan did change the model
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["block_reports"]) == {"embed", "layer.0", "layer.1", "head"}
    assert not (tmp_path / "out" / WORK).exists()


_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys, torch
    from fxcompress.blocks import compile_blocks
    g = torch.Generator().manual_seed(1)
    cal = [torch.randint(0, 128, (4, 16), generator=g) for _ in range(4)]
    chunks = None if sys.argv[4] == "None" else int(sys.argv[4])
    def progress(line):
        if line.startswith(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
    compile_blocks(sys.argv[1], sys.argv[2], calibration=cal, profile="mobile-arm",
                   tolerance=0.2, techniques=["intx", "int8"], progress=progress,
                   vocab_chunks=chunks)
""")


@pytest.mark.parametrize("chunks, kill_at, done_at_kill", [
    (None, "block 2/", ["embed", "layer.0"]),
    # the vocabulary in two chunks: killed between them, and after both but before the
    # embedding stage's output is written
    (2, "block 1/", ["embed.0"]),
    (2, "block 2/", ["embed.0", "embed.1"])])
def test_killed_run_resumes_to_the_same_bytes(llama, tmp_path, monkeypatch, chunks, kill_at,
                                              done_at_kill):
    folder, _ = llama
    monkeypatch.setenv("FXCOMPRESS_THREADS", "1")
    kw = dict(calibration=_calibration(), profile="mobile-arm", tolerance=0.2,
              techniques=["intx", "int8"], vocab_chunks=chunks)
    whole = compile_blocks(folder, tmp_path / "whole", **kw)
    env = dict(os.environ, FXCOMPRESS_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(folder),
                           str(tmp_path / "resumed"), kill_at, str(chunks)], env=env,
                          capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    state = json.loads((tmp_path / "resumed" / WORK / "state.json").read_text())
    assert [r["name"] for r in state["done"]] == done_at_kill
    assert not (tmp_path / "resumed" / MANIFEST).exists()
    lines = []
    resumed = compile_blocks(folder, tmp_path / "resumed", progress=lines.append, **kw)
    total = len(whole.blocks)
    assert total == (4 if chunks is None else 6)
    assert resumed.resumed_at == len(done_at_kill)
    assert lines[0].startswith(f"block {len(done_at_kill) + 1}/{total} ")
    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "resumed").iterdir())
    for name in files:
        if name != "report.json":  # it records the run's own times
            assert (tmp_path / "whole" / name).read_bytes() == \
                (tmp_path / "resumed" / name).read_bytes(), name
    assert resumed.error == whole.error and resumed.error <= kw["tolerance"]


def test_folder_of_another_run_is_refused(llama, tmp_path):
    folder, _ = llama
    work = tmp_path / "out" / WORK
    work.mkdir(parents=True)
    (work / "state.json").write_text(json.dumps({"fingerprint": "x", "threads": 1,
                                                 "done": []}))
    with pytest.raises(FxCompressError, match="other inputs"):
        compile_blocks(folder, tmp_path / "out", calibration=_calibration())


def test_memory_and_calibration_checked_before_any_work(llama, tmp_path):
    folder, _ = llama
    with pytest.raises(FxCompressError, match="GiB of memory"):
        compile_blocks(folder, tmp_path / "out", calibration=_calibration(),
                       memory_limit=1 << 20)
    assert not list((tmp_path / "out").glob("*.pt2"))
    with pytest.raises(FxCompressError, match="vocabulary"):
        compile_blocks(folder, tmp_path / "o2", calibration=[torch.full((2, 4), VOCAB)])
    with pytest.raises(FxCompressError, match="token ids"):
        compile_blocks(folder, tmp_path / "o3", calibration=[torch.randn(2, 4)])


def test_malformed_checkpoints_are_refused(llama, tmp_path):
    folder, _ = llama
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    shard = sorted(bad.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    with pytest.raises(FxCompressError, match="byte range"):
        Checkpoint(bad)
    shard.write_bytes(b"\xff" * 8 + b"{}")  # a header longer than the file
    with pytest.raises(FxCompressError, match="header claims"):
        Checkpoint(bad)
    shard.unlink()
    with pytest.raises(FxCompressError, match="names shard"):
        Checkpoint(bad)
    with pytest.raises(FxCompressError, match="no config.json"):
        Checkpoint(tmp_path)


def test_tampered_output_is_refused(llama, tmp_path):
    folder, _ = llama
    out = tmp_path / "out"
    compile_blocks(folder, out, calibration=_calibration(), tolerance=1.0,
                   techniques=["intx"])
    f = out / "layer.0.pt2"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(FxCompressError, match="differs from what"):
        load_blocks(out)
    with pytest.raises(FxCompressError, match="no complete"):
        load_blocks(tmp_path)


def test_ray_executor_gives_the_local_bytes(llama, tmp_path, monkeypatch):
    """Independent blocks (sequential=False) on a local Ray cluster of two workers: the same
    plan and the same files as the local executor."""
    pytest.importorskip("ray", reason="Ray is the optional 'ray' extra")
    folder, _ = llama
    monkeypatch.setenv("FXCOMPRESS_THREADS", "1")
    kw = dict(calibration=_calibration(), profile="mobile-arm", tolerance=0.2,
              techniques=["intx", "int8"], sequential=False)
    local = compile_blocks(folder, tmp_path / "local", **kw)
    lines = []
    remote = compile_blocks(folder, tmp_path / "ray", executor="ray", progress=lines.append,
                            **kw)
    assert remote.executor == "ray" and local.executor == "local" and len(lines) == 4
    assert [(b.name, b.applied, b.sha256) for b in remote.blocks] == \
        [(b.name, b.applied, b.sha256) for b in local.blocks]
    assert remote.error == local.error
    for name in ("embed.pt2", "layer.0.pt2", "layer.1.pt2", "head.pt2", MANIFEST):
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes()


def test_ray_needs_independent_blocks(llama, tmp_path):
    folder, _ = llama
    with pytest.raises(FxCompressError, match="sequential=False"):
        compile_blocks(folder, tmp_path / "o", calibration=_calibration(), executor="ray")
    with pytest.raises(FxCompressError, match="unknown"):
        compile_blocks(folder, tmp_path / "o", calibration=_calibration(), sequential=False,
                       executor="dask")
