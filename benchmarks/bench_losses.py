"""Forward+backward microbenchmark of the fused distillation losses.

Compares, in one process and on the same inputs, what a user would otherwise
run against kdfast's fused kernel:

* ``eager``: the loss as people write it in plain PyTorch (``log_softmax`` /
  ``softmax`` / ``F.kl_div``; ``benchmarks/plain_pytorch.py``), e.g. Hinton's
  KD ``F.kl_div(F.log_softmax(s/T), F.log_softmax(t/T), log_target=True,
  reduction="batchmean") * T**2``;
* ``compile``: the same plain code under ``torch.compile``;
* ``liger``: Liger-Kernel's ``LigerKLDIVLoss`` / ``LigerJSD`` / ``LigerTVDLoss``
  (kl / jsd / tvd, CUDA, when installed: ``pip install --no-deps liger-kernel``;
  fed the log-softmaxes or softmaxes they take, computed by PyTorch inside the
  timed step);
* ``kdfast``: kdfast's fused kernel (CPU C++ here; Triton with ``--device cuda``);
* ``reference`` (only when asked for with ``--methods``): kdfast's own
  validating pure-PyTorch reference, ``distill_loss(..., backend="torch")``.

The divergences of ``distill_loss`` are benchmarked with Hinton's ``T**2``
scale (``kd_loss``'s convention), ``wttm`` is ``kdfast.wttm_loss``; ``dist``,
``dkd`` and ``correlation`` are the losses of ``kdfast.correlation_losses``.
Every method gets the same number of timed runs (``--runs``, after a warm-up)
and the medians are reported, with the peak extra memory of one
forward+backward, the copy bandwidth and the fraction of that roofline the
kernel reaches (bytes: read both logits once, write the gradient once); on a
GPU also the fraction of its nominal HBM bandwidth.  Each record also holds its
loss value and its relative difference from the first method's (every method
computes the same loss).

    python benchmarks/bench_losses.py --quick          # the small shape, KD only
    python benchmarks/bench_losses.py                  # the full matrix (long)
    python benchmarks/bench_losses.py --device cuda    # GPU shapes, with Liger-Kernel

Results go to benchmarks/results/<device>-<date>.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import kdfast  # noqa: E402
from kdfast.config import DIVERGENCES  # noqa: E402
from kdfast.ops.backends import available_backends  # noqa: E402
from memory import peak_extra_bytes  # noqa: E402
from plain_pytorch import plain_loss, plain_other_loss  # noqa: E402

FULL_SHAPES = {"cpu": [(4096, 32000), (1024, 128256)], "cuda": [(8192, 32000), (8192, 128256), (4096, 256000)]}
QUICK_SHAPE = (512, 8192)
CLASSIFICATION_SHAPES = [(n, v) for n in (256, 1024, 8192) for v in (100, 1000)]
# Nominal HBM bandwidth (bytes/s) by device-name fragment, most specific first.
NOMINAL_HBM = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.04e12),
               ("A100", 1.56e12)]
PARAMS = {"jsd": {"beta": 0.5}, "renyi": {"alpha": 0.5}, "ab": {"alpha": 0.5, "beta": 0.5}, "skew_kl": {"skew": 0.1},
          "skew_reverse_kl": {"skew": 0.1}}


def machine_info(device=None) -> dict:
    """The machine a benchmark ran on (CPU, threads, versions, SIMD level, GPU of ``device``, load)."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "kdfast": kdfast.__version__,
        "kdfast_cpu_capability": kdfast.cpu_capability(),
        "torch_cpu_capability": _torch_cpu_capability(),
        "gpu": (torch.cuda.get_device_name(device) if torch.cuda.is_available()
                and (device is None or torch.device(device).type == "cuda") else None),
        "python": platform.python_version(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _torch_cpu_capability() -> str | None:
    """The SIMD level PyTorch's own CPU kernels use ('AVX512', 'AVX2', ...), when this torch says."""
    get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    return get() if get else None


def describe_machine(info: dict) -> str:
    """One line of ``machine_info``: CPU model, threads, SIMD level of the kernels, GPU, versions, load."""
    return (f"{info['cpu']} | {info['logical_cpus']} logical CPUs | torch {info['torch']} with "
            f"{info['torch_threads']} threads | SIMD: kdfast {info['kdfast_cpu_capability']}, "
            f"torch {info.get('torch_cpu_capability')}"
            + (f" | GPU {info['gpu']}" if info["gpu"] else "") + f" | load average {info['load_average_1m']}")


def nominal_bandwidth(device) -> float | None:
    """The GPU's nominal memory bandwidth in bytes/s when known (None on CPU or an unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in NOMINAL_HBM if key in name), None)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_once(fn, device) -> float:
    """Seconds of one ``fn()``: CUDA events on a GPU (the device's time, no host jitter), else the wall clock."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_runs(fn, runs: int, warmup: int, device) -> list:
    """The seconds of ``runs`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    return [time_once(fn, device) for _ in range(runs)]


def copy_bandwidth(numel: int, device, runs: int = 7) -> float:
    """Bytes per second of dst.copy_(src) (read + write), float32, preallocated buffers."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    times = time_runs(lambda: dst.copy_(src), runs, 2, device)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def bytes_moved(N: int, V: int, student_bytes: int, teacher_bytes: int) -> int:
    """The least traffic of one forward+backward: read both logits once, write the gradient once."""
    return N * V * (2 * student_bytes + teacher_bytes)


def roofline_fraction(moved: float, seconds: float, bandwidth: float | None) -> float | None:
    """The fraction of ``bandwidth`` (bytes/s) that moving ``moved`` bytes in ``seconds`` reaches."""
    if not bandwidth or not seconds:
        return None
    return moved / seconds / bandwidth


# The losses of kdfast.correlation_losses, benchmarked by name in place of a divergence.
OTHER_LOSSES = ("dist", "dkd", "correlation")
# Named forms of distill_loss benchmarked besides the divergences.
WEIGHTED_LOSSES = ("wttm",)
METHOD_ORDER = ["eager", "compile", "liger", "kdfast", "reference"]
DEFAULT_METHODS = ("eager", "compile", "liger", "kdfast")
# torch.compile keeps this many graphs per function; a matrix of losses x shapes x dtypes
# recompiles the one plain function more often than dynamo's default (8) allows, after
# which it would silently run eager.
RECOMPILE_LIMIT = 256


def loss_options(loss: str, temperature: float) -> dict:
    """The ``distill_loss`` keyword arguments of a benchmarked loss.

    A divergence gets Hinton's ``T**2`` scale (what people multiply by after
    dividing the logits by T) and its parameters of ``PARAMS``; ``wttm`` is
    ``kdfast.wttm_loss``: KL with the teacher at T, the student at 1, weighted.
    """
    if loss == "wttm":
        return dict(divergence="kl", temperature=temperature, student_temperature=1.0, weighting="wttm")
    return dict(divergence=loss, temperature=temperature, scale=temperature**2, **PARAMS.get(loss, {}))


def compile_plain(fn, backend: str = "inductor"):
    """``torch.compile`` of a plain loss, static shapes, with room for every case's recompilation."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), RECOMPILE_LIMIT))
    return torch.compile(fn, dynamic=False, backend=backend)


def fused_backend_for(device) -> str:
    """kdfast's fused backend for tensors on ``device``."""
    return "cpu" if device.type == "cpu" else "triton"


def make_methods(loss: str, temperature: float, device, backend: str | None = None,
                 compile_backend: str = "inductor"):
    """name -> ``fn(student, teacher) -> loss`` of every method available for ``loss`` here (see the module doc).

    ``backend``: kdfast's fused backend (default: the device's; ``"triton"`` on
    CPU tensors runs the Triton interpreter); ``compile_backend``: that of
    ``torch.compile`` (``"aot_eager"`` traces without generating code).
    """
    fused = backend or fused_backend_for(device)
    if loss in OTHER_LOSSES:
        return other_loss_methods(loss, temperature, device, fused, compile_backend)
    kw = loss_options(loss, temperature)
    compiled = compile_plain(plain_loss, compile_backend)
    methods = {"eager": lambda s, t: plain_loss(s, t, **kw), "compile": lambda s, t: compiled(s, t, **kw)}
    liger = liger_method(loss, temperature, device)
    if liger is not None:
        methods["liger"] = liger
    if fused in kdfast.available_backends():
        methods["kdfast"] = lambda s, t: kdfast.distill_loss(s, t, backend=fused, **kw)
    methods["reference"] = lambda s, t: kdfast.distill_loss(s, t, backend="torch", **kw)
    return methods


def labels_for(s):
    """Deterministic labels of DKD's rows (every class is a target somewhere)."""
    return torch.arange(s.shape[0], device=s.device) % s.shape[-1]


def other_loss_methods(loss: str, temperature: float, device, fused: str, compile_backend: str = "inductor"):
    """The methods of DIST, DKD, correlation: plain form (``plain_other_loss``), compiled, fused kernel, reference."""
    from kdfast import correlation_losses as cl

    # the extra positional arguments of each loss after (student, teacher): the defaults of kdfast's forms
    extra = {"dist": lambda s: (temperature, 1.0, 1.0),
             "dkd": lambda s: (labels_for(s), temperature, 1.0, 8.0),
             "correlation": lambda s: (temperature, 1.0, 1.0, 1.0, None)}[loss]
    public = {"dist": lambda s, t, b: cl.dist_loss(s, t, temperature, backend=b),
              "dkd": lambda s, t, b: cl.dkd_loss(s, t, labels_for(s), temperature, backend=b),
              "correlation": lambda s, t, b: cl.correlation_loss(s, t, temperature, backend=b)}[loss]
    plain = plain_other_loss(loss)
    compiled = compile_plain(plain, compile_backend)
    methods = {"eager": lambda s, t: plain(s, t, *extra(s)), "compile": lambda s, t: compiled(s, t, *extra(s))}
    if fused in available_backends(loss):
        methods["kdfast"] = lambda s, t: public(s, t, fused)
    methods["reference"] = lambda s, t: public(s, t, "torch")
    return methods


def liger_method(loss: str, temperature: float, device):
    """Liger-Kernel's loss for this divergence on the same inputs and value, or None (not installed, no GPU)."""
    if device.type != "cuda" or loss not in ("kl", "jsd", "tvd"):
        return None
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss, LigerTVDLoss
    except ImportError:
        return None
    scale = loss_options(loss, temperature)["scale"]
    if loss == "kl":
        kl_loss = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        return lambda s, t: kl_loss(torch.log_softmax(s / temperature, -1),
                                    torch.log_softmax(t / temperature, -1)) * scale
    if loss == "jsd":
        jsd_loss = LigerJSD(beta=PARAMS["jsd"]["beta"])  # (student log q, teacher log p), mean over rows
        return lambda s, t: jsd_loss(torch.log_softmax(s / temperature, -1),
                                     torch.log_softmax(t / temperature, -1)) * scale
    tvd_loss = LigerTVDLoss(reduction="batchmean")  # (student p, teacher q): the gradient is the first's
    return lambda s, t: tvd_loss(torch.softmax(s / temperature, -1), torch.softmax(t / temperature, -1)) * scale


def fwd_bwd(loss_fn, s, t):
    """One forward+backward; autograd.grad, so that no method pays for a copy into a leaf's .grad."""
    def run():
        loss = loss_fn(s, t)
        (grad,) = torch.autograd.grad(loss, s)
        return grad

    return run


def _measure(step, name, runs, device):
    """(times, peak extra bytes) of one method's forward+backward; ``runs`` timed calls whatever the method."""
    warmup = 2 if name == "compile" else 1
    times = time_runs(step, runs, warmup, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return times, torch.cuda.max_memory_allocated() - base
    kdfast.empty_cache()  # measure a cold call: the recycled gradient buffer would hide the allocation
    return times, peak_extra_bytes(step)


def _failure(error: BaseException, device) -> str:
    """What a failed method's record says; out-of-memory frees the cache so the next method starts clean."""
    if isinstance(error, torch.OutOfMemoryError):
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return "out of memory"
    return f"{type(error).__name__}: {str(error).strip()[:300]}"


def make_logits(N: int, V: int, dtype, device, seed: int = 0):
    """Student (requires grad) and teacher logits of one case, N(0, 4) entries.

    Drawn on ``device`` (a CPU draws a GPU case's 10^9 normals in seconds, per tensor).
    """
    g = torch.Generator(device=device).manual_seed(seed)
    s = (torch.randn(N, V, generator=g, device=device) * 2).to(dtype).requires_grad_()
    t = (torch.randn(N, V, generator=g, device=device) * 2).to(dtype)
    return s, t


def bench_case(loss, N, V, dtype, device, runs, temperature, methods_filter, bw, nominal_bw=None, *,
               backend=None, compile_backend="inductor", stop=None):
    """One record per method of one case (loss, shape, dtype).

    ``methods_filter``: the methods to run, in order (None: ``DEFAULT_METHODS``).  A
    method that fails (out of memory, or any error) gets a record with its
    ``error`` instead of times; ``stop()``, asked before each method, returns
    why to skip the rest (a spent time budget) or None.
    """
    s, t = make_logits(N, V, dtype, device)
    case = {"divergence": loss, "N": N, "V": V, "dtype": str(dtype).replace("torch.", "")}
    moved = bytes_moved(N, V, s.element_size(), t.element_size())
    methods = make_methods(loss, temperature, device, backend, compile_backend)
    records = []
    first_value = None
    for name in methods_filter or DEFAULT_METHODS:  # in the order asked: under a budget the first ones count
        fn = methods.get(name)
        if fn is None:
            continue
        reason = stop() if stop else None
        if reason:
            records.append(dict(case, method=name, skipped=reason))
            continue
        try:
            value = float(fn(s, t).detach())
            times, peak = _measure(fwd_bwd(fn, s, t), name, runs, device)
        except Exception as error:  # noqa: BLE001 - one method's failure is a result, not the end of the run
            records.append(dict(case, method=name, error=_failure(error, device)))
            continue
        first_value = value if first_value is None else first_value
        med = statistics.median(times)
        records.append(dict(
            case, method=name, runs=len(times), median_s=med, times_s=times, peak_extra_bytes=peak,
            grad_bytes=N * V * s.element_size(), bytes_moved=moved,
            roofline_fraction=roofline_fraction(moved, med, bw),
            nominal_roofline_fraction=roofline_fraction(moved, med, nominal_bw),
            # against the first method's value: a check that all methods compute the same loss
            value=value, value_rel_diff=abs(value - first_value) / max(abs(first_value), 1e-30),
        ))
    return records


def print_table(records):
    """One line per case: each method's time, kdfast's speed-up over each, its roofline fractions and memory."""
    by_case = {}
    for r in records:
        by_case.setdefault((r["divergence"], r["N"], r["V"], r["dtype"]), {})[r["method"]] = r
    methods = [m for m in METHOD_ORDER if any(m in c for c in by_case.values())]
    others = [m for m in methods if m != "kdfast"]
    header = (f"{'divergence':16s} {'N x V':>14s} {'dtype':>9s} " + " ".join(f"{m + ' ms':>12s}" for m in methods)
              + " " + " ".join(f"{'vs ' + m:>12s}" for m in others)
              + f" {'roofline':>8s} {'nominal':>8s} {'peak MB':>8s} {'grad MB':>8s}")
    print(header)
    print("-" * len(header))
    dash = f"{'-':>12s}"
    for (div, N, V, dt), m in by_case.items():
        ok = {k: r for k, r in m.items() if "median_s" in r}
        k = ok.get("kdfast")
        cells = [f"{ok[x]['median_s'] * 1e3:12.2f}" if x in ok
                 else (f"{'OOM' if m[x].get('error') == 'out of memory' else 'failed':>12s}"
                       if x in m and "error" in m[x] else dash)
                 for x in methods]
        cells += [f"{ok[x]['median_s'] / k['median_s']:11.2f}x" if k and x in ok else dash for x in others]
        roof = f"{k['roofline_fraction'] * 100:7.0f}%" if k else f"{'-':>8s}"
        nominal = (f"{k['nominal_roofline_fraction'] * 100:7.0f}%" if k and k["nominal_roofline_fraction"]
                   else f"{'-':>8s}")
        peak = f"{k['peak_extra_bytes'] / 2**20:8.0f}" if k and k["peak_extra_bytes"] is not None else f"{'-':>8s}"
        grad = f"{k['grad_bytes'] / 2**20:8.0f}" if k else f"{'-':>8s}"
        print(f"{div:16s} {f'{N} x {V}':>14s} {dt:>9s} " + " ".join(cells) + f" {roof} {nominal} {peak} {grad}")
    for r in records:
        if "error" in r:
            print(f"# {r['divergence']} {r['N']}x{r['V']} {r['dtype']} {r['method']}: {r['error']}")


# The foundation issue's target for 16-bit inputs: the fused kernel at least
# this much faster on bf16 logits than on fp32 ones, same shape and loss.
BF16_TARGET_SPEEDUP = 1.5


def dtype_speedups(records) -> list:
    """Per (divergence, N, V) measured in float32 and bfloat16: kdfast's fp32 time / its bf16 time."""
    kernel = {(r["divergence"], r["N"], r["V"], r["dtype"]): r["median_s"]
              for r in records if r["method"] == "kdfast" and "median_s" in r}
    out = []
    for (div, N, V, dt), fp32 in kernel.items():
        bf16 = kernel.get((div, N, V, "bfloat16"))
        if dt == "float32" and bf16:
            speedup = fp32 / bf16
            out.append({"divergence": div, "N": N, "V": V, "bf16_speedup_over_fp32": speedup,
                        "target": BF16_TARGET_SPEEDUP, "target_met": speedup >= BF16_TARGET_SPEEDUP})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help=f"only the quick shape {QUICK_SHAPE}, KD (kl)")
    ap.add_argument("--divergences", nargs="*", default=None,
                    help=f"divergences of distill_loss, {WEIGHTED_LOSSES} or {OTHER_LOSSES}; default: all "
                         "divergences (kl only with --quick)")
    ap.add_argument("--classification", action="store_true",
                    help=f"classification shapes {CLASSIFICATION_SHAPES} instead of the LLM ones")
    ap.add_argument("--shapes", nargs="*", default=None, help="NxV, e.g. 4096x32000")
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--methods", nargs="*", default=list(DEFAULT_METHODS), choices=METHOD_ORDER,
                    help=f"default {list(DEFAULT_METHODS)}; 'reference' adds kdfast's validating reference")
    ap.add_argument("--runs", type=int, default=7, help="timed runs of every method (after a warm-up)")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile's backend for 'compile' ('aot_eager': trace only, for quick checks)")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>-<date>.json)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda needs a CUDA GPU")
    if args.shapes:
        shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes]
    else:
        shapes = ([QUICK_SHAPE] if args.quick else CLASSIFICATION_SHAPES if args.classification
                  else FULL_SHAPES[device.type])
    divergences = args.divergences or (["kl"] if args.quick else list(DIVERGENCES))
    dtypes = [getattr(torch, d) for d in args.dtypes]

    info = machine_info(device)
    largest = max(N * V for N, V in shapes)
    bw = copy_bandwidth(largest, device)
    info["copy_bandwidth_GBps"] = bw / 1e9
    nominal_bw = nominal_bandwidth(device)
    info["nominal_bandwidth_GBps"] = nominal_bw / 1e9 if nominal_bw else None
    print(f"# {describe_machine(info)}")
    print(f"# copy bandwidth (read+write, preallocated): {bw / 1e9:.1f} GB/s; medians of {args.runs} runs "
          f"for every method; T = {args.temperature}"
          + (f"; nominal memory bandwidth {nominal_bw / 1e9:.0f} GB/s" if nominal_bw else ""))

    records = []
    for N, V in shapes:
        for dtype in dtypes:
            for div in divergences:
                records += bench_case(div, N, V, dtype, device, args.runs, args.temperature, args.methods, bw,
                                      nominal_bw, compile_backend=args.compile_backend)
                print(f"#   done {div} {N}x{V} {dtype}", file=sys.stderr, flush=True)
    print_table(records)
    speedups = dtype_speedups(records)
    for sp in speedups:
        print(f"# {sp['divergence']} {sp['N']}x{sp['V']}: bf16 {sp['bf16_speedup_over_fp32']:.2f}x faster than fp32 "
              f"(target {sp['target']}x: {'met' if sp['target_met'] else 'not met'})")

    tag = args.device if device.type == "cpu" else torch.cuda.get_device_name().replace(" ", "-")
    out = Path(args.out) if args.out else (
        Path(__file__).resolve().parent / "results" / f"{tag}-{_dt.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "bench_losses", "machine": info, "temperature": args.temperature, "runs": args.runs,
               "compile_backend": args.compile_backend, "records": records, "bf16_vs_fp32": speedups}
    out.write_text(json.dumps(payload, indent=1))
    print(f"# wrote {out}")
    return payload


if __name__ == "__main__":
    main()
