"""The rewrites, one per file, each a pure function of a graph and a frozen config.

Importing this package imports every module in it, and each module registers its technique
with the planner (see `fxcompress.technique`), so adding a pass is adding a file. Pass order is
the techniques' `order`; why it matters is written in `fxcompress.technique`.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

from fxcompress.passes.int8 import Int8Config, int8_pass  # noqa: E402
from fxcompress.passes.svd import SVDConfig, svd_pass  # noqa: E402

__all__ = ["Int8Config", "SVDConfig", "int8_pass", "svd_pass"]
