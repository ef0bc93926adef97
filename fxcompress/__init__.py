"""fxcompress: a hardware-aware model-compression compiler for PyTorch.

```python
small = fxcompress.compile(model, (x,), profile="mobile-arm", calibration=batches,
                           tolerance=0.01)
print(small.meta["fxcompress_report"])
torch.export.export(small, (x,))
```

The public contract (README.md, "Use"): `compile`, `export`, `load_profile`, `list_profiles`,
the report, and the exception types (`FxCompressError`, its `ExportError`, `InternalError`);
`sweep` compiles at several tolerances at once; `correct` and `accuracy` are classifier
metrics in the form `compile(evaluate=...)` takes.
"""

from fxcompress.api import DEFAULT_TOLERANCE, compile, sweep
from fxcompress.errors import ExportError, FxCompressError, InternalError
from fxcompress.export import export
from fxcompress.hardware_profiles import Profile, list_profiles, load_profile
from fxcompress.metrics import accuracy, correct
from fxcompress.passes_infra import PassResult
from fxcompress.recover import Recover
from fxcompress.report import Report

__all__ = [
    "DEFAULT_TOLERANCE",
    "ExportError",
    "FxCompressError",
    "InternalError",
    "PassResult",
    "Recover",
    "Profile",
    "Report",
    "accuracy",
    "compile",
    "correct",
    "export",
    "list_profiles",
    "load_profile",
    "sweep",
]
