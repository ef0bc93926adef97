"""share in recovery: shared weights train their palettes (centroid fine-tuning).

Each step's latent is its lookup table (groups x 2^bits), the indices stay fixed, and the
gathered weight's gradient sums into the entries it was gathered from. int8 lookup-table
entries train through a straight-through estimator of their rounding. On a member of a pruned
group the palette is the one the share pass clusters from the kept entries: it is widened to the
full weight for training (`on_kept`) and written back keyed to the sliced weight (`off_kept`),
so the pass stores it as trained.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import fx

from fxcompress.candidates import Candidate
from fxcompress.graph import get_attr
from fxcompress.passes.share import codebook_for
from fxcompress.passes.share.cluster import recoded
from fxcompress.technique import Trainable, straight_through


def _init(c: Candidate, base_w: torch.Tensor) -> list[torch.Tensor]:
    return [cb.lut.detach().float().clone() for _, cb in c.part("share").codebooks]


def lut_int8(lut: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 entries, one scale per table, as `cluster(lut_int8=True)` stores them."""
    scale = (lut.detach().abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)
    return torch.round(lut / scale).clamp(-127, 127), scale


def _lut(cb, lut: torch.Tensor) -> torch.Tensor:
    if cb.lut_q is None:
        return lut
    return straight_through(lambda t: lut_int8(t)[0] * lut_int8(t)[1])(lut)


def _weight(c: Candidate, i: int, lut: torch.Tensor) -> torch.Tensor:
    cb = c.part("share").codebooks[i][1]
    w = torch.gather(_lut(cb, lut), 1, cb.indices.long()).reshape(cb.shape)
    return w if cb.col_scale is None else w * cb.col_scale.to(w.dtype)


def _write(c: Candidate, latents: list[torch.Tensor], gm: fx.GraphModule) -> Candidate:
    spec = c.part("share")
    books = []
    for (src, cb), lut in zip(spec.codebooks, latents, strict=True):
        if cb.lut_q is not None:
            q, scale = lut_int8(lut)
            cb = replace(cb, lut=(q * scale).to(cb.lut.dtype), lut_q=q.to(torch.int8),
                         lut_scale=scale.float())
        else:
            cb = replace(cb, lut=lut.to(cb.lut.dtype).contiguous())
        books.append((src, cb))  # same source weight: the pass reuses this codebook
    return c.with_part("share", replace(spec, codebooks=tuple(books)))


def kept_shape(kept: torch.Tensor) -> tuple[int, ...]:
    """The shape of a tensor sliced by a product of per-axis masks."""
    return tuple(int(kept.movedim(a, 0).reshape(kept.shape[a], -1).any(1).sum())
                 for a in range(kept.dim()))


def _on_kept(c: Candidate, kept: torch.Tensor, full: torch.Tensor) -> Candidate:
    """The palette of a pruned group's member as the passes build it (prune slices the weight,
    a consumer's re-fit first; share clusters what is left afresh), its indices widened back to
    the full shape: removed entries pick entry 0, and are zero columns of a consumer (its mask)
    or rows whose outputs only such columns read. `c` is a one-step shared candidate."""
    spec = c.part("share")
    sliced = full[kept].reshape(kept_shape(kept))
    cb = codebook_for(sliced, spec)  # a trained one (`_off_kept`) where it is this weight
    idx = torch.zeros(full.shape, dtype=cb.indices.dtype)
    idx[kept] = cb.indices.reshape(-1)
    wide = replace(cb, shape=tuple(full.shape), indices=idx.reshape(cb.groups, -1))
    return c.with_part("share", replace(spec, codebooks=((full, wide),)))


def _off_kept(c: Candidate, kept: torch.Tensor, gm: fx.GraphModule) -> Candidate:
    """Undo `_on_kept` on the trained candidate: the codebook of the kept entries, keyed by
    the weight the prune pass will slice out of `gm` (written there), so the share pass stores
    this trained palette rather than clustering again."""
    spec = c.part("share")
    (_, wide), = spec.codebooks
    idx = wide.indices.reshape(wide.shape)[kept].reshape(wide.groups, -1)
    cb = replace(wide, shape=kept_shape(kept), indices=idx.contiguous())
    if cb.coded_bytes is not None:
        cb = recoded(cb)
    src = cb.decode()
    with torch.no_grad():
        w = get_attr(gm, c.layer.weight_target)
        w.zero_()
        w[kept] = src.reshape(-1).to(w.dtype)
    return c.with_part("share", replace(spec, codebooks=((src, cb),)))


#: share's trainable form (see `fxcompress.technique.Trainable`).
TRAINABLE = Trainable(_init, _write, _weight, on_kept=_on_kept, off_kept=_off_kept)
