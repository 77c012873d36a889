"""Keeps Triton 3.6's CPU interpreter working with NumPy >= 2.4.

Triton 3.6's interpreter holds every scalar kernel argument as a one-element
1-D array and converts it for ``range(0, V, BLOCK)`` with ``int(array)``.
NumPy 2.4 made that conversion an error ("only 0-dimensional arrays can be
converted to Python scalars"), so any kernel looping over a runtime bound
fails under ``TRITON_INTERPRET=1``.  Triton 3.7+ squeezes the array first;
this applies the same conversion to older interpreters.  It changes nothing
on a GPU (the interpreter is not used there) nor with a NumPy or Triton that
does not need it.
"""

from __future__ import annotations


def _numpy_refuses_1d_to_int() -> bool:
    import numpy as np

    try:
        int(np.ones(1, dtype=np.int32))
    except TypeError:
        return True
    return False


def apply() -> bool:
    """Installs the squeezing ``__index__`` when this Triton/NumPy pair needs it; True if it did."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_kdfast_compat", False):
        return False
    if not _numpy_refuses_1d_to_int():
        return False

    def patch_tensor_squeezing(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_tensor_squeezing._kdfast_compat = True
    interpreter._patch_lang_tensor = patch_tensor_squeezing
    return True
