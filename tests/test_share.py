"""Weight sharing: k-means palettes, packed indices decoded in the graph, stacking."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.api import serialized_size
from fxcompress.calibration import Calibration
from fxcompress.candidates import Candidate, step_of_layer
from fxcompress.capture import capture
from fxcompress.graph import find_layers, get_attr
from fxcompress.hardware_profiles import load_profile
from fxcompress.passes import int8 as int8_mod
from fxcompress.passes import share
from fxcompress.passes import svd as svd_mod
from fxcompress.planner import build
from fxcompress.technique import ProposeContext


class Tiny(nn.Module):
    """An embedding, a conv and two linears: every layer kind share rewrites."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(400, 32)
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 8)

    def forward(self, ids, img):
        h = self.emb(ids).mean(1) + self.conv(img).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(h)))


def _inputs(seed=0, batch=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 400, (batch, 6), generator=g), torch.randn(batch, 3, 6, 6,
                                                                         generator=g))


def _captured():
    torch.manual_seed(0)
    model = Tiny().eval()
    cap = capture(model, _inputs())
    return model, cap.graph_module


def _shared(gm, specs):
    out = copy.deepcopy(gm)
    find_layers(out)
    res = share.share_pass(out, share.ShareConfig(specs))
    res.graph_module.graph.lint()
    res.graph_module.recompile()  # as the pass manager does after every pass
    return res


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_roundtrip_every_width(bits):
    g = torch.Generator().manual_seed(bits)
    idx = torch.randint(0, 1 << bits, (3, 37), generator=g)  # 37: padding in every layout
    packed = share.pack(idx, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == 3 * share.math.ceil(37 * bits / 8 / (share._chunk(bits)[1])) * \
        share._chunk(bits)[1]
    assert torch.equal(share.unpack(packed, bits, 37), idx)


def test_error_falls_as_bits_grow_and_is_deterministic():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    errs = []
    for bits in range(1, 9):
        cb = share.cluster(w, bits, groups=4, seed=3)
        again = share.cluster(w, bits, groups=4, seed=3)
        assert torch.equal(cb.indices, again.indices) and torch.equal(cb.lut, again.lut)
        assert int(cb.indices.max()) < (1 << bits)
        errs.append(float((cb.decode() - w).norm() / w.norm()))
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs
    # Lloyd-Max on Gaussian data: 1 bit ~ 0.60, 4 bits ~ 0.10 relative error
    assert 0.55 < errs[0] < 0.65 and errs[3] < 0.12 and errs[7] < 0.01


def test_importance_weighting_protects_important_inputs():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 16, generator=g)
    imp = torch.ones(1, 16)
    imp[0, :4] = 100.0  # four inputs carry most of the signal
    plain = share.cluster(w, 2, seed=0)
    aware = share.cluster(w, 2, importance=imp, seed=0)

    def weighted(cb):
        return float((imp * (cb.decode() - w) ** 2).sum())

    assert weighted(aware) < 0.9 * weighted(plain)


@pytest.mark.parametrize("bits,grouped,lut_int8", [(4, False, False), (3, True, False),
                                                   (2, True, True), (8, False, True),
                                                   (6, False, False)])
def test_pass_decodes_exactly_the_clustered_weights(bits, grouped, lut_int8):
    model, gm = _captured()
    layers = find_layers(gm)
    specs, books = {}, {}
    for lay in layers:
        w = get_attr(gm, lay.weight_target)
        groups = share.group_count(w.shape[0], grouped)
        cb = share.cluster(w, bits, groups, lut_int8=lut_int8, seed=0)
        books[lay.weight_target] = cb
        specs[lay.name] = share.ShareSpec(bits, grouped, lut_int8, 0, ((w.detach(), cb),))
    res = _shared(gm, specs)
    out = res.graph_module
    out.graph.lint()
    assert res.modified
    targets = {n.target for n in out.graph.nodes if n.op == "get_attr"}
    assert not targets & set(books)  # the full-width weights are gone
    packed = [getattr(out, t) for t in targets if "share_idx" in t]
    assert all(p.dtype == torch.uint8 for p in packed)
    # one lookup table per tensor: one packed stream per width (emb + fc1 share one)
    streams = {cb.shape[-1] for cb in books.values() if cb.fusible}
    assert len(packed) == len(streams) + sum(not cb.fusible for cb in books.values())
    n_ops = sum(n.op == "call_function" for n in out.graph.nodes) - \
        sum(n.op == "call_function" for n in gm.graph.nodes)
    per_layer = sum(cb.decode_ops for cb in books.values())
    assert per_layer <= n_ops <= per_layer + 7 * len(streams)  # + each stream's unpacking
    # reference: the original model with the clustered weights put in, computed exactly
    ref = copy.deepcopy(model)
    sd = ref.state_dict()
    for t, cb in books.items():
        sd[t] = cb.decode()
    ref.load_state_dict(sd)
    x = _inputs(1)
    with torch.no_grad():
        assert torch.equal(out(*x), ref(*x))
    ep = torch.export.export(out, x, strict=False)
    assert torch.equal(ep.module()(*x), out(*x))


def _file_bytes(m, x) -> int:
    """Bytes of the `.pt2` fxcompress writes for `m` (without example rows)."""
    return serialized_size(torch.export.export(m, x, strict=False))


@pytest.mark.parametrize("bits,grouped", [(4, False), (3, True)])
def test_size_accounting_matches_the_file(bits, grouped):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    x = (torch.randn(2, 256),)
    gm = capture(model, x).graph_module
    specs, accounted = {}, 0
    for lay in find_layers(gm):
        w = get_attr(gm, lay.weight_target)
        cb = share.cluster(w, bits, share.group_count(w.shape[0], grouped), seed=0)
        specs[lay.name] = share.ShareSpec(bits, grouped, False, 0, ((w.detach(), cb),))
        accounted += w.numel() * 4 - cb.file_bytes
        assert cb.stored_bytes == cb.packed_bytes + cb.lut_bytes
        assert cb.packed_bytes == share.math.ceil(w.numel() / cb.groups * bits / 8 /
                                                  share._chunk(bits)[1]) \
            * share._chunk(bits)[1] * cb.groups
    out = _shared(gm, specs).graph_module
    saved = _file_bytes(gm, x) - _file_bytes(out, x)
    # the file saves what the candidates account for (decode graph included) within 1 %
    assert abs(saved - accounted) < 0.01 * accounted


def test_entropy_coded_indices_take_their_deflated_bytes_in_the_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    with torch.no_grad():  # bell-shaped, as trained weights are (not the uniform init)
        for lin in (model[0], model[2]):
            lin.weight.normal_(0, 0.05)
    x = (torch.randn(2, 256),)
    gm = capture(model, x).graph_module
    specs, accounted, books = {}, 0, {}
    for lay in find_layers(gm):
        w = get_attr(gm, lay.weight_target).detach()
        cb = share.cluster(w, 8, 1, seed=0, grid=3)
        km = share.cluster(w, 3, 1, seed=0)

        def err(c, w=w):
            return float((c.decode() - w).norm() / w.norm())

        # a 3-bit palette's error or less, in under 0.95 of its packed indices' bytes
        assert err(cb) <= err(km)
        assert cb.packed_bytes < 0.95 * km.packed_bytes
        assert not cb.fusible  # its own record, deflated alone
        books[lay.weight_target] = cb
        specs[lay.name] = share.ShareSpec(8, False, False, 0, ((w, cb),), grid=3)
        accounted += w.numel() * 4 - cb.file_bytes
    out = _shared(gm, specs).graph_module
    ref = copy.deepcopy(model)
    sd = ref.state_dict()
    sd.update({t: cb.decode() for t, cb in books.items()})
    ref.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(out(*x), ref(*x))
    saved = _file_bytes(gm, x) - _file_bytes(out, x)
    assert abs(saved - accounted) < 0.01 * accounted  # the deflated codes, as accounted
    res = fxcompress.export(out, x, tmp_path / "m.pt2")  # torch's reader inflates them
    assert res.check_error == 0.0


def test_entropy_coded_column_steps_cut_the_weighted_error_and_the_bytes():
    torch.manual_seed(0)
    lin = nn.Linear(256, 128).eval()
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
    w = lin.weight.detach()
    x = torch.randn(4096, 256) * torch.randn(256).exp()  # inputs of uneven scale
    h = (x.T @ x / len(x)).double()

    def werr(cb):
        d = (cb.decode() - w).double()
        return float(((d @ h) * d).sum() / ((w.double() @ h) * w.double()).sum()) ** 0.5

    steps = share.cluster(w, 8, 1, seed=0, hessian=h, grid=3)
    flat = share.cluster(w, 8, 1, seed=0, hessian=h * 0 + torch.eye(256, dtype=h.dtype) *
                         h.diagonal().mean(), grid=3)  # equal columns: one step
    assert steps.col_scale is not None and steps.col_scale.shape == (256,)
    assert flat.col_scale is None
    # steps by h_j^-1/2: less error through h than one step, in fewer bytes
    assert werr(steps) < 0.95 * werr(flat)
    assert steps.packed_bytes < flat.packed_bytes
    gm = capture(nn.Sequential(lin), (x[:2],)).graph_module
    lay, = find_layers(gm)
    out = _shared(gm, {lay.name: share.ShareSpec(8, False, False, 0, ((w, steps),),
                                                 grid=3)}).graph_module
    with torch.no_grad():
        assert torch.equal(out(x[:4]), nn.functional.linear(x[:4], steps.decode(), lin.bias))
    saved = _file_bytes(gm, (x[:2],)) - _file_bytes(out, (x[:2],))
    accounted = w.numel() * 4 - steps.file_bytes
    assert abs(saved - accounted) < 0.01 * accounted


def test_entropy_coded_variant_only_for_size_on_targets_that_load_the_pt2():
    _, gm = _captured()
    fc1 = next(lay for lay in find_layers(gm) if lay.name == "fc1")

    def coded(profile, objective="size"):
        _, base, ctx = _context(gm, fc1, profile)
        cands, _ = share.propose(fc1, base, replace(ctx, objective=objective))
        return sorted(c.part("share").grid for c in cands if c.part("share").grid)

    assert coded("x86-server") == list(share.CODED_WIDTHS)
    assert coded("x86-server", "latency") == []  # a byte an index in memory
    assert coded("apple-ane") == []  # Core ML stores the byte indices as they are
    assert coded("mcu-int8") == []  # so does a .pte


def _context(gm, layer, profile="apple-ane"):
    calib = Calibration(gm, [_inputs(2, 16)], {lay.node: lay.op for lay in find_layers(gm)})
    w = get_attr(gm, layer.weight_target).detach()
    b = get_attr(gm, layer.bias_target).detach() if layer.bias_target else None
    ctx = ProposeContext(load_profile(profile), "size", calib.stats[layer.node], None, w, b, 0,
                         True, True)
    return calib, Candidate("none", layer, {}, (step_of_layer(layer, w, b),)), ctx


def test_propose_offers_every_profile_width_and_counts_packed_bytes():
    _, gm = _captured()
    fc1 = next(lay for lay in find_layers(gm) if lay.name == "fc1")
    calib, base, ctx = _context(gm, fc1)
    cands, why = share.propose(fc1, base, ctx)
    assert why is None
    prof = load_profile("apple-ane")
    assert sorted({c.params["bits"] for c in cands}) == sorted(prof.share_bits)
    for c in cands:
        cb = c.part("share").codebooks[0][1]
        step = c.steps[0]
        assert step.fmt == "shared"
        assert step.weight_bytes == cb.file_bytes > cb.packed_bytes + cb.lut_bytes
        assert torch.equal(step.weight, cb.decode())
    # a target without palettized weights gets none, with the reason
    _, base, ctx = _context(gm, fc1, "fpga-binary")
    cands, why = share.propose(fc1, base, ctx)
    assert not cands and "palettized" in why


def test_stacks_on_svd_factors_and_int8_leaves_shared_weights_alone():
    _, gm = _captured()
    layers = find_layers(gm)
    fc1 = next(lay for lay in layers if lay.name == "fc1")
    calib, base, ctx = _context(gm, fc1)
    # factors at rank 4, built as svd's own candidates are (this random layer's spectrum is
    # too flat for svd to offer a rank on its own)
    v, u = svd_mod.decompose(ctx.weight).factors(4)
    svd_cand = Candidate("svd", fc1, {"rank": 4, "aware": False},
                         svd_mod._steps(fc1, v, u, ctx.bias),
                         parts={"svd": svd_mod.SVDPart(v, u, 0.0)})
    stacked = share.stack(svd_cand, ctx)
    assert stacked.technique == "svd+share" and len(stacked.steps) == 2
    assert all(s.fmt == "shared" for s in stacked.steps)
    # int8 never re-quantizes a palettized chain; share offers int8 LUT entries itself
    assert int8_mod.stack(stacked, ctx) is None
    built = build(gm, {fc1.name: stacked}).graph_module
    built.graph.lint()
    fc1_ops = [n for n in built.graph.nodes if n.meta.get("fxcompress_layer") == "fc1"
               and n.target is torch.ops.aten.linear.default]
    assert len(fc1_ops) == 2
    assert all(n.args[1].op == "call_function" for n in fc1_ops)  # decoded, not stored
    # what the planner measured is what was built
    assert calib.error_of(built) == pytest.approx(calib.error(stacked.simulation()), rel=1e-5)
    again = int8_mod.int8_pass(copy.deepcopy(built), int8_mod.Int8Config(frozenset({"fc1"})))
    assert not again.modified


def test_pass_reclusters_a_weight_changed_upstream():
    """A weight the planner never saw (pruned or refactored before share ran) is clustered
    from the graph as it is, at the planned width."""
    _, gm = _captured()
    fc1 = next(lay for lay in find_layers(gm) if lay.name == "fc1")
    stale = torch.randn(fc1.weight_shape[0] * 2, fc1.weight_shape[1])
    spec = share.ShareSpec(2, False, False, 0, ((stale, share.cluster(stale, 2)),))
    out = _shared(gm, {"fc1": spec}).graph_module
    out.graph.lint()
    idx = next(n.target for n in out.graph.nodes if n.op == "get_attr"
               and n.target.startswith("share_idx"))
    assert out.fc1_share_lut.numel() == 4
    w = get_attr(gm, fc1.weight_target)
    cb = share.cluster(w, 2, seed=0)
    assert torch.equal(share.unpack(getattr(out, idx), 2, w.numel()), cb.indices.long())


def test_compile_apple_ane_shares_the_layers_that_pay():
    torch.manual_seed(0)
    model = Tiny().eval()
    x = _inputs()
    before = copy.deepcopy(model.state_dict())
    out = fxcompress.compile(model, x, profile="apple-ane", techniques=["share"],
                             calibration=[_inputs(i, 8) for i in range(3)], tolerance=0.05)
    rep = out.meta["fxcompress_report"]
    applied = {lay.name: lay.applied for lay in rep.layers}
    assert applied["emb"].startswith("share(") and applied["fc1"].startswith("share(")
    # fc2's 512 weights repay their decode (a row slice and a lookup in the fused stream,
    # about 0.2 kB of deflated program): shared too
    assert applied["fc2"].startswith("share(")
    assert rep.error <= 0.05
    saved = rep.serialized_bytes_before - rep.serialized_bytes_after
    planned = sum(lay.bytes_before - lay.bytes_after for lay in rep.layers)
    assert saved > 0.3 * rep.serialized_bytes_before
    # the report's bytes are the file's, but for the one packed stream's unpacking (<= 7 ops)
    assert abs(saved - planned) < 0.05 * planned + 7 * share.GRAPH_BYTES_PER_OP
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    torch.export.export(out, _inputs(5), strict=False)


def test_compensated_assignment_cuts_output_error_with_the_same_palette():
    g = torch.Generator().manual_seed(4)
    # correlated inputs (most of their energy in 12 directions), as a layer's inputs are
    x = torch.randn(2048, 12, generator=g) @ torch.randn(12, 48, generator=g) \
        + 0.1 * torch.randn(2048, 48, generator=g)
    w = torch.randn(32, 48, generator=g)
    h = x.T.double() @ x.double() / len(x)
    plain = share.cluster(w, 3, groups=2, importance=h.diagonal().float().view(1, -1))
    comp = share.cluster(w, 3, groups=2, hessian=h)
    again = share.cluster(w, 3, groups=2, hessian=h)
    assert torch.equal(comp.indices, again.indices)
    assert torch.equal(comp.lut, plain.lut) and not torch.equal(comp.indices, plain.indices)
    assert int(comp.indices.max()) < 8

    def out_err(cb):
        return float(((cb.decode() - w) @ x.T).norm() / (w @ x.T).norm())

    assert out_err(comp) < 0.7 * out_err(plain), (out_err(comp), out_err(plain))
    # a Hessian that does not match the weight's columns (a conv, a stale one) is ignored
    conv = torch.randn(8, 4, 3, 3, generator=g)
    assert torch.equal(share.cluster(conv, 2, hessian=h).indices, share.cluster(conv, 2).indices)


class EmbMean(nn.Module):
    """Embedding, mean over the sequence, a linear head: logits = A mean_s(E[ids])."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 4, bias=False)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


def test_output_hessian_is_exact_for_few_outputs_and_estimated_for_many():
    torch.manual_seed(0)
    model = EmbMean().eval()
    ids = torch.randint(0, 50, (64, 5), generator=torch.Generator().manual_seed(1))
    gm = capture(model, (ids[:2],)).graph_module
    node = next(lay.node for lay in find_layers(gm) if lay.op == "embedding")
    a = model.head.weight.detach().double()
    # d logits / d emb-output at each of the 64 x 5 positions is A / 5
    want = 64 * 5 * (a.T @ a) / 25
    exact = share.output_hessian(gm, node, [(ids,)])
    assert torch.allclose(exact, want, rtol=1e-5)
    est = share.output_hessian(gm, node, [(ids,)], seed=3, probes=2)  # 4 outputs > 2 probes
    assert torch.equal(est, share.output_hessian(gm, node, [(ids,)], seed=3, probes=2))
    assert float((est - want).norm() / want.norm()) < 0.3
    assert share.output_hessian(gm, "no_such_node", [(ids,)]) is None


def test_pass_reclusters_a_pruned_weight_through_the_planned_hessian():
    _, gm = _captured()
    fc1 = next(lay for lay in find_layers(gm) if lay.name == "fc1")
    w = get_attr(gm, fc1.weight_target).detach()
    h = torch.randn(32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    h = h @ h.T
    stale = torch.randn(w.shape[0] * 2, w.shape[1])
    spec = share.ShareSpec(3, False, False, 0, ((stale, share.cluster(stale, 3)),), h)
    out = _shared(gm, {"fc1": spec}).graph_module
    idx = next(n.target for n in out.graph.nodes if n.op == "get_attr"
               and n.target.startswith("share_idx"))
    want = share.cluster(w, 3, seed=0, hessian=h)
    assert not torch.equal(want.indices, share.cluster(w, 3, seed=0).indices)
    assert torch.equal(share.unpack(getattr(out, idx), 3, w.numel()), want.indices.long())


def test_prune_then_share_stacks_per_layer_and_shrinks_the_file_further():
    from fxcompress.api import prepare
    from fxcompress.technique import compatible

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    x = (torch.randn(4, 64),)
    prep = prepare(model, x, profile="apple-ane", objective="size", holdout=0,
                   techniques=["prune", "share", "svd"],
                   calibration=[(torch.randn(512, 64,
                                             generator=torch.Generator().manual_seed(1)),)])
    gm, opts, calib = prep.graph_module, prep.options, prep.calib
    group = next(o for o in opts if o.layer.name.startswith("prune[") and o.candidates)
    pruned = group.candidates[0]
    shares = {o.layer.name: next(c for c in o.candidates if c.technique == "share"
                                 and c.params["bits"] == 4)
              for o in opts if o.layer.name in pruned.touches}
    assert len(shares) == 2 and all(compatible(pruned, c) for c in shares.values())
    svd_share = next(c for o in opts for c in o.candidates if c.technique == "svd+share")
    assert not compatible(pruned, svd_share)  # factors computed for the unpruned shapes
    sizes, errs = {}, {}
    for name, choice in (("prune", {group.layer.name: pruned}), ("share", shares),
                         ("both", {group.layer.name: pruned, **shares})):
        built = build(gm, choice).graph_module
        built.graph.lint()
        sizes[name], errs[name] = _file_bytes(built, x), calib.error_of(built)
        if name == "both":
            luts = [n for n in built.graph.nodes if n.op == "get_attr" and "share_lut" in n.target]
            assert len(luts) == 2
            lins = [n for n in built.graph.nodes if n.target is torch.ops.aten.linear.default]
            assert all(n.args[1].op == "call_function" for n in lins)  # decoded weights
            assert lins[0].args[1].meta["val"].shape[0] < 256  # the pruned rows are gone
    assert sizes["both"] < min(sizes["prune"], sizes["share"])
    assert errs["both"] < (errs["prune"] ** 2 + errs["share"] ** 2) ** 0.5 * 1.5 + 1e-3


class _Attention(nn.Module):
    """Multi-head attention through SDPA: the output projection's input is the heads merged
    back, which ExecuTorch's own decomposition of the attention leaves strided."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, -1))
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(a.transpose(1, 2).reshape(b, s, d))


def test_shared_linear_behind_attention_lowers_to_pte(tmp_path):
    """A shared output projection of an attention (MiniLM's attention.output.dense) used to
    make ExecuTorch's XNNPACK lowering fail (`ConvertToLinearPass`: a 3-D weight); its input
    is now made contiguous, and the .pte runs and matches the compiled graph."""
    pytest.importorskip("executorch.runtime")
    torch.manual_seed(0)
    model = _Attention().eval()
    x = torch.randn(2, 6, 32)
    gm = capture(model, (x,)).graph_module
    res = _shared(gm, share.uniform_config(gm, 2).layers)
    kinds = [n.target for n in res.graph_module.graph.nodes]
    assert torch.ops.aten.clone.default in kinds
    out = fxcompress.export(res.graph_module, (x,), tmp_path / "m.pte", profile="mobile-arm")
    assert out.path.stat().st_size > 0 and out.check_error < 1e-3
