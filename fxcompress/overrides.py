"""Per-layer settings: `compile(..., overrides=...)`.

`overrides` maps a key to the settings it gives the layers it selects:

- `"*"`: every layer (the global setting);
- `"op:<type>"`: every layer of that op type (`op:linear`, `op:conv2d`, `op:embedding`);
- anything else: a pattern on layer names, as in `fnmatch` (`"fc1"`, `"encoder.*.attention*"`).

Settings are a dict with any of:

- `"skip": True`: leave the layer alone (no rewrite of its own, and no pruned group that
  changes its weight);
- `"techniques": [...]`: only these techniques for the layer (a subset of those the compile
  runs);
- `"rank": r`: SVD factors the layer at exactly rank r (or not at all);
- `"bits": b`: quantized or palettized candidates only at b bits (int8: 8, share: the
  profile's palette widths, binary: 1); rewrites without a bit width are unaffected;
- `"<technique>": {...}`: that technique's settings for the layer, fields of its settings
  dataclass (`fxcompress.technique.Technique.settings`, e.g. `{"svd": {"sequential_refit":
  False}}`, `{"prune": {"ratios": [0.5]}}`); rewrites spanning several layers (pruned groups)
  take the `"*"` key's.

One precedence: global < op type < name pattern; among name patterns, a later key wins over an
earlier one; each setting (and each field of a technique's settings) is resolved on its own,
so `{"*": {"techniques": ["int8"]}, "fc1": {"bits": 8}}` gives fc1 both. `resolve` is the one
function that does it; the report names, for every layer, the keys that applied. Every key
must select at least one layer, and every setting is checked before any work: a typo is an
error, not a silent no-op.
"""

from __future__ import annotations

import fnmatch
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fxcompress.errors import FxCompressError
from fxcompress.technique import REGISTRY, check_settings

SETTINGS = ("skip", "techniques", "rank", "bits")
EXAMPLE = ('e.g. overrides={"fc1": {"skip": True}, "op:conv2d": {"techniques": ["int8"]}, '
           '"encoder.*": {"rank": 32}}')


@dataclass(frozen=True)
class LayerSettings:
    """The settings one layer resolved to, and the keys they came from."""

    skip: bool = False
    techniques: tuple[str, ...] | None = None  # None: every technique the compile runs
    rank: int | None = None
    bits: int | None = None
    keys: tuple[str, ...] = ()  # the overrides keys that applied, in precedence order
    # technique name -> the fields of its settings these overrides change
    knobs: Mapping[str, Mapping] | None = None

    def describe(self) -> str:
        """The settings in a few words, for the report."""
        parts = []
        if self.skip:
            parts.append("skip")
        if self.techniques is not None:
            parts.append("techniques " + ", ".join(self.techniques))
        if self.rank is not None:
            parts.append(f"rank {self.rank}")
        if self.bits is not None:
            parts.append(f"bits {self.bits}")
        for tech, changes in (self.knobs or {}).items():
            parts.append(f"{tech} " + ", ".join(f"{k}={v!r}" for k, v in changes.items()))
        return "; ".join(parts)


def check_overrides(overrides, techniques: Sequence[str]) -> dict[str, dict]:
    """`overrides` as a plain dict of checked settings (None: no overrides); the user error
    for anything malformed. `techniques`: the names a compile may use."""
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise FxCompressError(f"overrides must be a dict from layer pattern to settings, not "
                              f"{type(overrides).__name__}; {EXAMPLE}")
    out = {}
    for key, settings in overrides.items():
        if not isinstance(key, str) or not key:
            raise FxCompressError(f"overrides key {key!r} is not a layer pattern; keys are '*', "
                                  f"'op:<type>' or a layer-name pattern; {EXAMPLE}")
        if key.startswith("op:") and key[3:] not in ("linear", "conv2d", "embedding"):
            raise FxCompressError(f"overrides key {key!r}: unknown op type {key[3:]!r}; use "
                                  "op:linear, op:conv2d or op:embedding")
        if not isinstance(settings, Mapping):
            raise FxCompressError(f"overrides[{key!r}] must be a dict of settings, not "
                                  f"{type(settings).__name__}; {EXAMPLE}")
        tunable = sorted(t for t, tech in REGISTRY.items() if tech.settings is not None)
        unknown = [k for k in settings if k not in SETTINGS and k not in tunable]
        if unknown:
            raise FxCompressError(f"overrides[{key!r}] has unknown setting(s) "
                                  f"{', '.join(map(repr, unknown))}; use {', '.join(SETTINGS)}"
                                  f", or a technique's name for its settings "
                                  f"({', '.join(tunable)})")
        out[key] = _checked(key, dict(settings), techniques)
    return out


def _checked(key: str, s: dict, techniques: Sequence[str]) -> dict:
    where = f"overrides[{key!r}]"
    if "skip" in s and not isinstance(s["skip"], bool):
        raise FxCompressError(f"{where}['skip'] must be True or False, not {s['skip']!r}")
    if "techniques" in s:
        t = s["techniques"]
        names = [t] if isinstance(t, str) else t
        if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
            raise FxCompressError(f"{where}['techniques'] must be a list of technique names, "
                                  f"not {t!r}; e.g. ['int8']")
        bad = [n for n in names if n not in techniques]
        if bad:
            raise FxCompressError(f"{where}['techniques'] names {', '.join(map(repr, bad))}, "
                                  f"which this compile does not run; use a subset of "
                                  f"{', '.join(techniques)}")
        s["techniques"] = tuple(names)
    for name in ("rank", "bits"):
        if name in s:
            v = s[name]
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < 1:
                raise FxCompressError(f"{where}[{name!r}] must be a positive integer, not "
                                      f"{v!r}")
            s[name] = int(v)
    for tech in [k for k in s if k not in SETTINGS]:
        s[tech] = check_settings(tech, s[tech], f"{where}[{tech!r}]")
    if s.get("bits") is not None and s["bits"] > 8:
        raise FxCompressError(f"{where}['bits'] is {s['bits']}; fxcompress quantizes to 8 bits "
                              "or fewer (int8: 8, palettes: the profile's widths, binary: 1)")
    return s


def _precedence(key: str) -> int:
    return 0 if key == "*" else 1 if key.startswith("op:") else 2


def _selects(key: str, name: str, op: str) -> bool:
    if key == "*":
        return True
    if key.startswith("op:"):
        return op == key[3:]
    return fnmatch.fnmatchcase(name, key)


def resolve(overrides: Mapping[str, dict], name: str, op: str) -> LayerSettings:
    """The settings of layer `name` (op type `op`): global < op type < name pattern, later
    name patterns over earlier ones, each setting on its own."""
    keys = sorted((k for k in overrides if _selects(k, name, op)),
                  key=lambda k: _precedence(k))  # stable: patterns keep their given order
    return _merged(overrides, keys)


def _merged(overrides: Mapping[str, dict], keys: Sequence[str]) -> LayerSettings:
    merged: dict = {}
    knobs: dict[str, dict] = {}
    for k in keys:
        for name, value in overrides[k].items():
            if name in SETTINGS:
                merged[name] = value
            else:  # a technique's settings: field by field
                knobs.setdefault(name, {}).update(value)
    return LayerSettings(skip=bool(merged.get("skip", False)),
                         techniques=merged.get("techniques"), rank=merged.get("rank"),
                         bits=merged.get("bits"), keys=tuple(keys), knobs=knobs or None)


def resolve_global(overrides: Mapping[str, dict]) -> LayerSettings:
    """The settings of the `"*"` key alone: what applies to rewrites that span several layers
    (a pruned group), whose layers' own patterns may disagree."""
    return _merged(overrides, [k for k in overrides if k == "*"])


def resolve_all(overrides: Mapping[str, dict], layers: Sequence) -> dict[str, LayerSettings]:
    """Settings per layer name for `layers` (each with `.name` and `.op`); the user error for
    a key that selects no layer."""
    out = {lay.name: resolve(overrides, lay.name, lay.op) for lay in layers}
    used = {k for s in out.values() for k in s.keys}
    unused = [k for k in overrides if k not in used]
    if unused:
        names = ", ".join(lay.name for lay in layers[:12]) + (", ..." if len(layers) > 12
                                                              else "")
        raise FxCompressError(f"overrides key(s) {', '.join(map(repr, unused))} select no "
                              f"layer; the model's layers are {names} (op types: "
                              f"{', '.join(sorted({lay.op for lay in layers}))})")
    return out
