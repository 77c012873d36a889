"""Build of kdfast and its C++ extension ``kdfast._C``.

The extension is optional at run time (kdfast falls back to the pure-PyTorch
reference with one warning), so a failed build does not fail the install
unless ``KDFAST_REQUIRE_EXTENSION=1`` (what CI sets). ``KDFAST_NO_EXTENSION=1``
skips it.

No ``-march=native``: the AVX2/AVX-512 kernels are enabled per translation unit
and chosen at run time, so one build runs on any x86-64.
"""

import os
import subprocess
import sys

from setuptools import setup


def _import_torch():
    """Import torch, also from inside pip's isolated build environment.

    pip builds in an environment that hides site-packages; declaring torch as a
    build requirement would make pip download the registry's newest (CUDA)
    wheel there, several GB, and build against a torch other than the one that
    will run the extension.  So we build against the torch of the interpreter
    that runs pip: ask a clean subprocess where it lives.
    """
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"],
            env=env, capture_output=True, text=True, check=True,
        ).stdout.strip().splitlines()[-1]
    except (subprocess.CalledProcessError, IndexError, OSError):
        return False
    sys.path.append(out)
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def _extensions():
    if os.environ.get("KDFAST_NO_EXTENSION") == "1":
        return [], {}
    if not _import_torch():
        if os.environ.get("KDFAST_REQUIRE_EXTENSION") == "1":
            raise RuntimeError("kdfast: torch is not importable, cannot build kdfast._C")
        print("kdfast: torch not found; installing without the C++ extension", file=sys.stderr)
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    class OptionalBuildExtension(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                if os.environ.get("KDFAST_REQUIRE_EXTENSION") == "1":
                    raise
                print(f"kdfast: building the C++ extension failed ({exc}); kdfast will use the "
                      "reference backend", file=sys.stderr)

    here = os.path.dirname(os.path.abspath(__file__))
    sources = [
        "csrc/distill_op.cpp",
        "csrc/correlation_ops.cpp",
        "csrc/topk_op.cpp",
        "csrc/ltkd_op.cpp",
        "csrc/grouped_kd_op.cpp",
        "csrc/kernels/cpu_dispatch.cpp",
        "csrc/kernels/distill_cpu_default.cpp",
        "csrc/kernels/distill_cpu_avx2.cpp",
        "csrc/kernels/distill_cpu_avx512.cpp",
        "csrc/kernels/distill_cpu_avx512_bf16.cpp",
        "csrc/kernels/ltkd_cpu_default.cpp",
        "csrc/kernels/ltkd_cpu_avx2.cpp",
        "csrc/kernels/ltkd_cpu_avx512.cpp",
        "csrc/kernels/ltkd_cpu_avx512_bf16.cpp",
        "csrc/kernels/grouped_kd_cpu_default.cpp",
        "csrc/kernels/grouped_kd_cpu_avx2.cpp",
        "csrc/kernels/grouped_kd_cpu_avx512.cpp",
        "csrc/kernels/grouped_kd_cpu_avx512_bf16.cpp",
        "csrc/kernels/selftest.cpp",
    ]
    ext = CppExtension(
        "kdfast._C",
        sources,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-fopenmp", "-fno-math-errno"]},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
