"""What the interpreter cannot show about the Triton kernels: that they compile for a GPU.

The interpreter runs the kernels' Python, not their compiled form.  Here every
divergence, with the features that change the code (labels, the CE term at
another temperature, each weighting, no gradient, each dtype), is compiled to
PTX and a cubin for an H100 (sm_90) by Triton's own toolchain, which needs no
GPU, in a separate process (``compile_triton_for_gpu.py``).
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from compile_triton_for_gpu import (CORRELATION_VARIANTS, DIST_VARIANTS, DIVERGENCES, DKD_VARIANTS,
                                    REVISE_VARIANTS, TOPK_BUCKET_VARIANTS, TOPK_TEACHER_VARIANTS, VARIANTS,
                                    variant_id)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def report():
    script = Path(__file__).with_name("compile_triton_for_gpu.py")
    root = str(script.parent.parent)
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_policy_compiles_for_a_gpu_without_spills(report, divergence, variant):
    entry = report[variant_id(divergence, variant)]
    assert entry["ok"], entry.get("error")
    assert not entry["spills"], "registers spill to local memory"


@pytest.mark.parametrize("variant", REVISE_VARIANTS, ids=lambda v: "-".join(map(str, v)))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_label_revision_compiles_for_a_gpu_without_spills(report, divergence, variant):
    """The row kernel with Label Revision (REVISE): its per-row fix-up and the revised label entry."""
    entry = report[variant_id(divergence, variant, revise=True)]
    assert entry["ok"], entry.get("error")
    assert not entry["spills"], "registers spill to local memory"


def test_row_offsets_are_64_bit(report):
    """``row * stride`` is an i64 product: N * V > 2^31 cannot wrap (a known bug class of Triton KD kernels)."""
    ttir = report[variant_id("kl", VARIANTS[0])]["ttir"]
    for base in ("S_row", "T_row", "G_row"):
        assert re.search(rf"%{base}\S* = arith\.muli %row\S*, %{base}\S* : i64", ttir), base


def test_reduction_kernel_compiles_for_a_gpu(report):
    assert report["reduce"]["ok"], report["reduce"].get("error")


@pytest.mark.parametrize("variant", DKD_VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_dkd_kernel_compiles_for_a_gpu_without_spills(report, variant):
    entry = report["dkd-" + "-".join(map(str, variant))]
    assert entry["ok"], entry.get("error")
    assert not entry["spills"], "registers spill to local memory"


def test_autotuning_configs_are_small_and_fixed():
    from kdfast.ops.triton import launch

    configs = launch._GPU_CONFIGS
    assert 1 <= len(configs) <= 8
    assert all(c.kwargs["BLOCK"] & (c.kwargs["BLOCK"] - 1) == 0 for c in configs)  # powers of two
    assert launch._distill_rows.keys == ["V", "DIV", "WEIGHTING", "HARD", "COMPUTE_GRAD", "REVISE"]


@pytest.mark.parametrize("variant", DIST_VARIANTS, ids="-".join)
def test_dist_kernels_compile_for_a_gpu_without_spills(report, variant):
    entry = report["dist-" + "-".join(variant)]
    assert entry["ok"], entry.get("error")
    assert not entry["spills"], "registers spill to local memory"


@pytest.mark.parametrize("variant", CORRELATION_VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_correlation_kernel_compiles_for_a_gpu_without_spills(report, variant):
    entry = report["correlation-" + "-".join(map(str, variant))]
    assert entry["ok"], entry.get("error")
    assert not entry["spills"], "registers spill to local memory"


@pytest.mark.parametrize("variant", TOPK_BUCKET_VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_topk_bucket_kernels_compile_for_a_gpu_without_spills(report, variant):
    entry = report["topk-bucket-" + "-".join(map(str, variant))]
    assert entry["ok"], entry.get("error")
    assert not entry["spills"], "registers spill to local memory"


@pytest.mark.parametrize("variant", TOPK_TEACHER_VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_topk_teacher_kernel_compiles_for_a_gpu_without_spills(report, variant):
    """The teacher rows' checks, its sort of k indices included, up to the kernel's largest k."""
    entry = report["topk-teacher-" + "-".join(map(str, variant))]
    assert entry["ok"], entry.get("error")
    assert not entry["spills"], "registers spill to local memory"
