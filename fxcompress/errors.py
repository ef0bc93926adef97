"""The two exception types of fxcompress.

`FxCompressError` is the user's mistake: an unknown profile, a malformed profile file, a model
that cannot be captured, calibration inputs that do not match, a tolerance out of range, a
technique the target cannot run. Its message says what was wrong and what to do.

`InternalError` is our bug: a pass that broke the graph, an invariant that did not hold. Its
message names the failing pass and the passes that ran before it.
"""

from __future__ import annotations


class FxCompressError(ValueError):
    """A mistake in what the user passed in; the message names the fix."""


class InternalError(RuntimeError):
    """A bug in fxcompress; please report it with the message."""
