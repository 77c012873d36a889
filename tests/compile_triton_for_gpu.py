"""Compiles the Triton kernels for an H100 (sm_90) without a GPU; prints a JSON report.

Run in a process of its own (``TRITON_INTERPRET`` must be off when the
kernels are decorated, and the test session runs them interpreted):
``python tests/compile_triton_for_gpu.py``.  Used by ``test_triton.py``;
``python tests/compile_triton_for_gpu.py ltkd`` compiles only the LTKD kernels (``test_ltkd_fused.py``).
"""

import json
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kdfast.ops.triton import row_kernel
from kdfast.registry import DIVERGENCE_NAMES, needs_grad_sum, weighting_spec

DIVERGENCES = list(DIVERGENCE_NAMES)
# (logits dtype, accumulation, weighting, labels, hard-label CE at tau_s != 1, gradient)
VARIANTS = [
    ("bf16", "fp32", "wttm", True, True, True),
    ("fp32", "fp32", "entropy", False, False, False),
    ("fp64", "fp64", "given", True, False, True),
    ("fp16", "fp32", "none", True, False, True),
]
# Label Revision (REVISE): every divergence with labels, in bf16 with the CE term, and in fp64.
REVISE_VARIANTS = [VARIANTS[0], VARIANTS[2]]
TARGET = GPUTarget("cuda", 90, 32)


def variant_id(divergence, variant, revise=False):
    return "-".join((["revise"] if revise else []) + [divergence] + [str(v) for v in variant])


def compile_row_kernel(divergence, dtype, acc, weighting, labels, student_t1, grad, block=4096, revise=False):
    signature = {"S_ptr": f"*{dtype}", "T_ptr": f"*{dtype}", "s_row_stride": "i32", "t_row_stride": "i32",
                 "G_ptr": f"*{dtype}", "LABELS_ptr": "*i64", "WEIGHTS_ptr": "*fp64", "PARAMS_ptr": "*fp64",
                 "INV_DENOM_ptr": "*fp64", "ROW_LOSS_ptr": f"*{acc}", "STATUS_ptr": "*i32", "V": "i32",
                 "ignore_index": "i32"}
    constexprs = dict(DIV=divergence, WEIGHTING=weighting, NEEDS_T1=weighting_spec(weighting).needs_teacher_t1,
                      HAS_LABELS=labels, HARD=labels, STUDENT_T1=student_t1,
                      SUM_G=needs_grad_sum(divergence), COMPUTE_GRAD=grad,
                      ACC=tl.float64 if acc == "fp64" else tl.float32, BLOCK=block, REVISE=revise)
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(fn=row_kernel.distill_rows_kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=TARGET, options={"num_warps": 8})


def compile_dkd_kernel(dtype, acc, grad, block=4096):
    from kdfast.ops.triton.dkd import dkd_rows_kernel

    signature = {"S_ptr": f"*{dtype}", "T_ptr": f"*{dtype}", "s_row_stride": "i32", "t_row_stride": "i32",
                 "G_ptr": f"*{dtype}", "LABELS_ptr": "*i64", "PARAMS_ptr": "*fp64", "ROW_LOSS_ptr": f"*{acc}",
                 "STATUS_ptr": "*i32", "V": "i32", "ignore_index": "i32",
                 "COMPUTE_GRAD": "constexpr", "ACC": "constexpr", "BLOCK": "constexpr"}
    constexprs = dict(COMPUTE_GRAD=grad, ACC=tl.float64 if acc == "fp64" else tl.float32, BLOCK=block)
    source = ASTSource(fn=dkd_rows_kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=TARGET, options={"num_warps": 8})


DKD_VARIANTS = [("bf16", "fp32", True), ("fp32", "fp32", False), ("fp64", "fp64", True)]
DIST_VARIANTS = [("bf16", "fp32"), ("fp32", "fp32"), ("fp64", "fp64")]


def compile_dist_kernels(dtype, acc):
    """The four DIST kernels for one dtype; the last compiled (the gradient kernel) is returned."""
    from kdfast.ops.triton import dist

    acc_tl = tl.float64 if acc == "fp64" else tl.float32
    logits = {"S_ptr": f"*{dtype}", "T_ptr": f"*{dtype}", "s_row_stride": "i32", "t_row_stride": "i32"}
    kernels = [
        (dist.dist_row_kernel, dict(logits, PARAMS_ptr="*fp64", ROW_ptr="*fp64", RHO_ptr="*fp64", STATUS_ptr="*i32",
                                    V="i32"), {"BLOCK": 4096}),
        (dist.dist_column_moments_kernel, dict(logits, PARAMS_ptr="*fp64", ROW_ptr="*fp64", MOM_ptr="*fp64", N="i32",
                                               V="i32", ROWS_PER_CHUNK="i32"), {"BLOCK_C": 128}),
        (dist.dist_column_kernel, dict(S_ptr=f"*{dtype}", T_ptr=f"*{dtype}", PARAMS_ptr="*fp64", ROW_ptr="*fp64",
                                       MOM_ptr="*fp64", COL_ptr=f"*{acc}", COL_RHO_ptr="*fp64", V="i32", CHUNKS="i32"),
         {"BLOCK_C": 128}),
        (dist.dist_grad_kernel, dict(logits, G_ptr=f"*{dtype}", PARAMS_ptr="*fp64", ROW_ptr="*fp64",
                                     COL_ptr=f"*{acc}", V="i32"), {"BLOCK": 4096}),
    ]
    compiled = None
    for fn, signature, blocks in kernels:
        constexprs = dict(blocks, ACC=acc_tl)
        signature.update({name: "constexpr" for name in constexprs})
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET,
                                  options={"num_warps": 8})
        if ".local" in compiled.asm["ptx"]:
            return compiled
    return compiled


# (logits dtype, accumulation, weights, gradient, V): V = 4096 is the loss's cap (the largest row block)
CORRELATION_VARIANTS = [("bf16", "fp32", True, True, 4096), ("fp32", "fp32", False, True, 1000),
                        ("fp32", "fp32", True, False, 100), ("fp64", "fp64", False, True, 4096)]


def compile_correlation_kernel(dtype, acc, weights, grad, V):
    from kdfast.ops.triton import correlation

    block_v, block_j, warps = correlation._launch_shape(V)
    signature = {"S_ptr": f"*{dtype}", "T_ptr": f"*{dtype}", "s_row_stride": "i32", "t_row_stride": "i32",
                 "G_ptr": f"*{dtype}", "W_ptr": "*fp64", "PARAMS_ptr": "*fp64", "ROW_LOSS_ptr": f"*{acc}",
                 "STATUS_ptr": "*i32", "V": "i32"}
    constexprs = dict(HAS_WEIGHTS=weights, COMPUTE_GRAD=grad, ACC=tl.float64 if acc == "fp64" else tl.float32,
                      BLOCK_V=block_v, BLOCK_J=block_j)
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(fn=correlation.correlation_rows_kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=TARGET, options={"num_warps": warps})


# (logits dtype, accumulation, index dtype, hard-label CE, unit vocabulary stride)
TOPK_BUCKET_VARIANTS = [("bf16", "fp32", "i32", True, True), ("fp32", "fp32", "i64", False, False),
                        ("fp64", "fp64", "i64", True, True), ("fp16", "fp32", "i64", True, False),
                        ("bf16", "fp64", "i64", True, True)]


def compile_topk_bucket_kernels(dtype, acc, index, hard, unit_stride):
    """The two kernels of the top-k bucket op (kdfast/ops/triton/topk_bucket.py) at their GPU tiles.

    Both are compiled (a failure raises); returns the first whose PTX spills, else the statistics kernel."""
    from kdfast.ops.triton import topk_bucket

    acc_tl = tl.float64 if acc == "fp64" else tl.float32
    student = {"S_ptr": f"*{dtype}", "s_row_stride": "i32", "s_col_stride": "i32"}
    kernels = [
        (topk_bucket.bucket_row_stats_kernel,
         dict(student, SORTED_ptr=f"*{index}", BOUNDS_ptr="*i32", STATS_ptr=f"*{acc}", PARAMS_ptr="*fp64", N="i32",
              V="i32", k="i32", n_blocks="i32"),
         topk_bucket.STATS_BLOCK, topk_bucket.STATS_WARPS),
        (topk_bucket.bucket_grad_kernel,
         dict(student, G_ptr=f"*{dtype}", STATS_ptr=f"*{acc}", GB_ptr=f"*{acc}", C_ptr=f"*{acc}", LABELS_ptr="*i64",
              PARAMS_ptr="*fp64", N="i32", V="i32"),
         topk_bucket.GRAD_BLOCK, topk_bucket.GRAD_WARPS),
    ]
    compiled = []
    for fn, signature, block, warps in kernels:
        constexprs = dict(HARD=hard, UNIT_STRIDE=unit_stride, ACC=acc_tl, BLOCK=block)
        signature.update({name: "constexpr" for name in constexprs})
        compiled.append(triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET,
                                       options={"num_warps": warps}))
        if ".local" in compiled[-1].asm["ptx"]:
            return compiled[-1]
    return compiled[0]


# (log-probs dtype, accumulation, index dtype, k, tail given, ignored rows, bucket): k = 4096 is the kernel's cap
TOPK_TEACHER_VARIANTS = [("bf16", "fp32", "i32", 64, False, True, True),
                         ("fp16", "fp32", "i64", 256, True, False, True),
                         ("fp32", "fp32", "i64", 1024, False, True, False),
                         ("fp64", "fp64", "i64", 256, True, True, True),
                         ("bf16", "fp32", "i64", 4096, False, False, True)]


def compile_topk_teacher_kernel(dtype, acc, index, k, tail, valid, bucket):
    """The top-k teacher rows' kernel (kdfast/ops/triton/topk_teacher.py) at its GPU launch for ``k``."""
    from kdfast.ops.triton import topk_teacher

    block_k = topk_teacher._block_k(k)
    signature = {"IDX_ptr": f"*{index}", "LP_ptr": f"*{dtype}", "REST_ptr": f"*{dtype}", "VALID_ptr": "*u8",
                 "IDX_OUT_ptr": "*i64", "ORDERED_ptr": "*i64", "TEACHER_ptr": f"*{acc}", "STATUS_ptr": "*i32",
                 "PARAMS_ptr": "*fp64", "V": "i32", "k": "i32"}
    constexprs = dict(HAS_REST=tail, HAS_VALID=valid, BUCKET=bucket, ACC=tl.float64 if acc == "fp64" else tl.float32,
                      BLOCK_K=block_k)
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(fn=topk_teacher.topk_teacher_kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=TARGET, options={"num_warps": topk_teacher._warps(block_k)})


# (logits dtype, accumulation, group lanes GP, rebalancing prior, teacher weights, gradient)
LTKD_VARIANTS = [("bf16", "fp32", 4, True, False, True), ("fp32", "fp32", 4, False, True, False),
                 ("fp16", "fp32", 16, True, False, True), ("fp64", "fp64", 4, True, True, True)]


def compile_ltkd_kernels(dtype, acc, gp, prior, teacher_weighting, grad):
    """The two LTKD kernels (kdfast/ops/triton/ltkd.py) at their GPU tiles for ``gp`` group lanes.

    Both are compiled (a failure raises); returns the first whose PTX spills, else the loss kernel."""
    from kdfast.ops.triton import ltkd

    launch = {"BLOCK": max(128, ltkd._LANES_PER_TILE // gp), "num_warps": 8}  # ltkd._launch_config on a GPU
    acc_tl = tl.float64 if acc == "fp64" else tl.float32
    logits = {"S_ptr": f"*{dtype}", "T_ptr": f"*{dtype}", "s_row_stride": "i32", "t_row_stride": "i32"}
    kernels = [
        (ltkd.ltkd_rows_kernel,
         dict(logits, G_ptr=f"*{dtype}", GROUPS_ptr="*i32", PRIOR_ptr="*fp64", PARAMS_ptr="*fp64",
              INV_DENOM_ptr="*fp64", ROW_LOSS_ptr=f"*{acc}", STATUS_ptr="*i32", V="i32"),
         dict(HAS_PRIOR=prior, TEACHER_WEIGHTING=teacher_weighting, COMPUTE_GRAD=grad)),
        (ltkd.ltkd_teacher_groups_kernel,
         dict(logits, GROUPS_ptr="*i32", PARAMS_ptr="*fp64", OUT_ptr="*fp64", STATUS_ptr="*i32", V="i32",
              NUM_GROUPS="i32"), {}),
    ]
    compiled = []
    for fn, signature, flags in kernels:
        constexprs = dict(flags, ACC=acc_tl, BLOCK=launch["BLOCK"], GP=gp)
        signature.update({name: "constexpr" for name in constexprs})
        compiled.append(triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET,
                                       options={"num_warps": launch["num_warps"]}))
        if ".local" in compiled[-1].asm["ptx"]:
            return compiled[-1]
    return compiled[0]


def ltkd_report():
    return {"ltkd-" + "-".join(map(str, v)): _report(lambda v=v: compile_ltkd_kernels(*v)) for v in LTKD_VARIANTS}


def compile_reduce_kernel():
    source = ASTSource(fn=row_kernel.reduce_kernel, constexprs={"BLOCK": 1024},
                       signature={"ROW_LOSS_ptr": "*fp32", "OUT_ptr": "*fp32", "INV_DENOM_ptr": "*fp64", "N": "i32",
                                  "BLOCK": "constexpr"})
    return triton.compile(source, target=TARGET)


def _report(compile_fn):
    try:
        compiled = compile_fn()
    except Exception as exc:  # reported, not raised: one failure must not hide the others
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    return {"ok": bool(compiled.asm.get("cubin")), "spills": ".local" in compiled.asm["ptx"],
            "ttir": compiled.asm["ttir"]}


def main():
    report = {variant_id(d, v): _report(lambda d=d, v=v: compile_row_kernel(d, *v))
              for d in DIVERGENCES for v in VARIANTS}
    report.update({variant_id(d, v, True): _report(lambda d=d, v=v: compile_row_kernel(d, *v, revise=True))
                   for d in DIVERGENCES for v in REVISE_VARIANTS})
    report["reduce"] = _report(compile_reduce_kernel)
    for variant in DKD_VARIANTS:
        report["dkd-" + "-".join(map(str, variant))] = _report(lambda v=variant: compile_dkd_kernel(*v))
    for variant in DIST_VARIANTS:
        report["dist-" + "-".join(variant)] = _report(lambda v=variant: compile_dist_kernels(*v))
    for variant in CORRELATION_VARIANTS:
        report["correlation-" + "-".join(map(str, variant))] = _report(
            lambda v=variant: compile_correlation_kernel(*v))
    for variant in TOPK_BUCKET_VARIANTS:
        report["topk-bucket-" + "-".join(map(str, variant))] = _report(
            lambda v=variant: compile_topk_bucket_kernels(*v))
    for variant in TOPK_TEACHER_VARIANTS:
        report["topk-teacher-" + "-".join(map(str, variant))] = _report(
            lambda v=variant: compile_topk_teacher_kernel(*v))
    report.update(ltkd_report())
    for key, entry in report.items():
        if key != variant_id("kl", VARIANTS[0]):
            entry.pop("ttir", None)
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    if sys.argv[1:] == ["ltkd"]:  # only the LTKD kernels (tests/test_ltkd_fused.py)
        json.dump({key: {k: v for k, v in entry.items() if k != "ttir"} for key, entry in ltkd_report().items()},
                  sys.stdout)
    else:
        main()
