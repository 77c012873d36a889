"""Loading of the C++ extension ``kdfast._C``.

kdfast must import without it (a machine where the build failed, a source
checkout): then the 'cpu' backend is unavailable, ``backend="auto"`` uses the
reference, and one warning says so.  ``KDFAST_DISABLE_EXTENSION=1`` simulates
that case.
"""

from __future__ import annotations

import os
import warnings

_C = None
load_error: str | None = None

if os.environ.get("KDFAST_DISABLE_EXTENSION") == "1":
    load_error = "disabled by KDFAST_DISABLE_EXTENSION=1"
else:
    try:
        import torch  # noqa: F401  (the extension links against libtorch: import it first)

        from .. import _C as _loaded

        _C = _loaded
    except (ImportError, OSError) as exc:
        load_error = f"{type(exc).__name__}: {exc}"

if _C is None:
    warnings.warn(
        f"kdfast: the C++ extension kdfast._C is not available ({load_error}); the 'cpu' backend is off and "
        "kdfast falls back to the pure-PyTorch reference (correct, but slower). Reinstall with "
        "`pip install --no-build-isolation -e .` and a working C++ compiler to build it.",
        RuntimeWarning,
        stacklevel=2,
    )


def cpu_extension_available() -> bool:
    return _C is not None
