"""Test-speed help for Triton's CPU interpreter (``TRITON_INTERPRET=1``).

The interpreter re-patches ``triton.language`` on every call of a device
function (``inspect.getmembers`` over the whole module), which is 1-2 ms per
call, i.e. most of the time of a kernel built from small policy functions.
Within one launch the patch is the same every time, so it is applied once per
language module per launch here.  Nothing about what the kernels compute
changes; if Triton's internals move, this does nothing and tests are slower.
"""

from __future__ import annotations


def speed_up_interpreter() -> bool:
    """Installs the once-per-launch patching; True when it could."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    run_grid = getattr(getattr(interpreter, "GridExecutor", None), "__call__", None)
    patch_lang = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if run_grid is None or patch_lang is None or scope_type is None or getattr(patch_lang, "_kdfast", False):
        return False
    tl = interpreter.tl
    patched = set()  # language modules patched during the current launch

    def run_grid_once_patched(self, *args, **kwargs):
        patched.clear()
        try:
            return run_grid(self, *args, **kwargs)
        finally:
            patched.clear()

    def patch_once(fn):
        langs = {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}
        if langs and langs <= patched:
            return scope_type()
        patched.update(langs)
        return patch_lang(fn)

    patch_once._kdfast = True
    interpreter.GridExecutor.__call__ = run_grid_once_patched
    interpreter._patch_lang = patch_once
    return True
