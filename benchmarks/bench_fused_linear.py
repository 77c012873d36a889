"""Forward+backward time and peak memory of the fused linear + distillation loss.

The ways to get ``KL(p_teacher || q_student)`` (batchmean, T = 1) and the
student's gradients (hidden states and LM-head weight) from the two heads:

* ``eager``:  what a user writes: materialise both ``(N, V)`` logits
  (``hidden @ weight.T``, the teacher's under ``no_grad``), then the KL in plain
  PyTorch (``benchmarks/plain_pytorch.py``: ``F.kl_div`` of float32
  log-softmaxes) and autograd through it and the matmul;
* ``materialised`` (only when asked for): the same logits, then
  ``kdfast.distill_loss`` (the fused kernel) instead of the plain KL;
* ``kdfast``: ``kdfast.llm.fused_linear.fused_linear_distill_loss`` (chunked, no
  ``(N, V)`` tensor; chunk size chosen automatically);
* ``kdfast_mm`` (only when asked for): the same with ``torch.mm`` (MKL) instead
  of oneDNN for the chunks' logits, to measure what oneDNN brings;
* ``liger``:  Liger-Kernel's ``LigerFusedLinearJSDLoss`` (its chunked PyTorch
  implementation, which also runs on CPU) with ``beta=0``, where Liger's
  generalised JSD is exactly ``KL(p_teacher || q_student)``, ``weight_hard_loss=0``,
  ``weight_soft_loss=1`` (the same value), its default ``chunk_size=1024`` and
  ``compiled=True`` (its default; ``--liger-eager`` turns torch.compile off).
  Installed with ``pip install --no-deps liger-kernel``; skipped when missing.

Time: the methods run side by side in one process on the same inputs,
round-robin (so a busy machine slows them alike), after a warm-up each; the
median of ``--runs`` forward+backward steps is reported.

Peak memory (CPU): each method runs in a fresh subprocess that builds the
inputs, warms the method up once at the full shape, releases kdfast's cached
gradient buffers (``kdfast.empty_cache()``), and then measures one
forward+backward as ``VmHWM - VmRSS before`` (``benchmarks/memory.py``: the
kernel's resident high-water mark, reset just before; every allocation counts,
PyTorch's, the extension's and inductor's).  CUDA: ``max_memory_allocated``
minus the allocation before the step.  Timing, memory, machine record and the
plain KL are :mod:`kdfast.bench`'s (``kdfast bench --losses fused_linear`` runs
the same comparison at one hidden size; this script adds the A/B methods and
the issue's memory targets).

    python benchmarks/bench_fused_linear.py --quick     # small shape
    python benchmarks/bench_fused_linear.py             # N=4096, H=576, V=49152 fp32 (CPU)
    python benchmarks/bench_fused_linear.py --device cuda   # BT=8192, H_s=2048, H_t=4096, V=128256 bf16

Results go to ``benchmarks/results/<device>-<date>-fused-linear-<shape>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import kdfast  # noqa: E402
from kdfast.llm.fused_linear import fused_linear_distill_loss  # noqa: E402
from kdfast.bench.baselines import plain_loss  # noqa: E402
from kdfast.bench.families import fused_linear_inputs  # noqa: E402
from kdfast.bench.machine import describe_machine, machine_info  # noqa: E402
from kdfast.bench.memory import peak_memory_of  # noqa: E402
from kdfast.bench.timing import sync, time_once, time_round_robin  # noqa: E402

METHODS = ("eager", "kdfast", "liger", "materialised", "kdfast_mm")
DEFAULT_METHODS = ("eager", "kdfast", "liger")
# The acceptance targets of the CPU shape: kdfast's peak extra memory at most
# 20% of eager's (the materialised logits and plain KL), and its time no worse.
MEMORY_TARGET = 0.20


@dataclass(frozen=True)
class Shape:
    rows: int
    hidden_student: int
    hidden_teacher: int
    vocab: int
    dtype: str

    @property
    def label(self) -> str:
        h = (f"{self.hidden_student}" if self.hidden_student == self.hidden_teacher
             else f"{self.hidden_student}-{self.hidden_teacher}")
        return f"{self.rows}x{h}x{self.vocab}-{self.dtype}"


SHAPES = {
    "cpu": Shape(4096, 576, 576, 49152, "float32"),
    "cpu-quick": Shape(1024, 256, 256, 8192, "float32"),
    "cuda": Shape(8192, 2048, 4096, 128256, "bfloat16"),
    "cuda-quick": Shape(2048, 1024, 2048, 32000, "bfloat16"),
}


# ----------------------------------------------------------------- inputs and methods
def make_inputs(shape: Shape, device: torch.device, seed: int = 0) -> dict:
    """Hidden states and LM-head weights of a student and a teacher (no biases, as in most LLMs)."""
    return fused_linear_inputs(shape.rows, shape.hidden_student, shape.vocab, getattr(torch, shape.dtype), device,
                               seed, teacher_hidden=shape.hidden_teacher)


def make_method(name: str, inputs: dict, liger_compiled: bool = True, backend: str = "auto"):
    """A callable running one forward+backward and returning ``(loss, grad_hidden, grad_weight)``, or None.

    ``backend``: kdfast's (``"triton"`` runs its Triton kernels, through the
    interpreter on CPU tensors; ``"auto"``: the device's fused kernel).
    """
    hs, ws, ht, wt = (inputs[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight"))

    def grads_of(loss):
        return (loss.detach(), *torch.autograd.grad(loss, (hs, ws)))

    def materialised(loss_fn):
        def step():
            student_logits = hs @ ws.T
            with torch.no_grad():
                teacher_logits = ht @ wt.T
            return grads_of(loss_fn(student_logits, teacher_logits))

        return step

    if name == "eager":
        return materialised(plain_loss)
    if name == "materialised":
        return materialised(lambda s, t: kdfast.distill_loss(s, t, divergence="kl", backend=backend))
    if name == "kdfast":
        return lambda: grads_of(fused_linear_distill_loss(hs, ws, ht, wt, divergence="kl", backend=backend))
    if name == "kdfast_mm":
        import kdfast.llm.chunking as chunking

        def without_onednn():
            use = chunking.uses_onednn
            chunking.uses_onednn = lambda weight: False
            try:
                return grads_of(fused_linear_distill_loss(hs, ws, ht, wt, divergence="kl"))
            finally:
                chunking.uses_onednn = use

        return without_onednn
    if name == "liger":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        except ImportError:
            return None
        # beta = 0: Liger's generalised JSD is KL(teacher || student), the loss of the other two.
        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=1.0,
                                        compiled=liger_compiled)
        return lambda: grads_of(liger(hs, ws, ht, wt, inputs["labels"]))
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")


# ----------------------------------------------------------------- time
def time_side_by_side(methods: dict, runs: int, device: torch.device) -> dict:
    """Per method, the seconds of ``runs`` steps taken round-robin after one warm-up each."""
    for step in methods.values():
        step()
    sync(device)
    return time_round_robin({name: (lambda step=step: time_once(step, device)) for name, step in methods.items()},
                            runs)


def results_agree(methods: dict) -> dict:
    """Relative differences of each method's loss and gradients from the first method's (all compute one loss)."""
    outputs = {name: step() for name, step in methods.items()}
    base_name = next(iter(outputs))
    base = outputs[base_name]
    diffs = {}
    for name, out in outputs.items():
        diffs[name] = [float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))
                       for a, b in zip(out, base)]
    return {"relative_to": base_name, "loss_grad_hidden_grad_weight": diffs}


# ----------------------------------------------------------------- memory
def peak_memory_in_subprocess(name: str, shape: Shape, device: torch.device, liger_compiled: bool) -> int | None:
    """Runs this script as ``--child-memory`` in a fresh interpreter: nothing of the other methods is resident."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-memory", name, "--shape",
           f"{shape.rows}x{shape.hidden_student}x{shape.hidden_teacher}x{shape.vocab}", "--dtype", shape.dtype,
           "--device", device.type]
    if not liger_compiled:
        cmd.append("--liger-eager")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"  memory of {name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def child_memory(name: str, shape: Shape, device: torch.device, liger_compiled: bool) -> None:
    step = make_method(name, make_inputs(shape, device), liger_compiled)
    print(json.dumps({"method": name, "peak_extra_bytes": peak_memory_of(step, device)}))


# ----------------------------------------------------------------- driver
def parse_shape(text: str, dtype: str) -> Shape:
    parts = [int(x) for x in text.lower().split("x")]
    if len(parts) == 3:
        rows, hidden, vocab = parts
        return Shape(rows, hidden, hidden, vocab, dtype)
    if len(parts) == 4:
        return Shape(*parts, dtype)
    raise argparse.ArgumentTypeError(f"--shape is NxHxV or NxH_sxH_txV, got {text!r}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="the small shape of the device")
    p.add_argument("--shape", help="NxHxV or NxH_sxH_txV (overrides the device's shape)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="overrides the shape's dtype")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS,
                   help="kdfast_mm: kdfast with torch.mm for the chunk logits instead of oneDNN (an A/B)")
    p.add_argument("--runs", type=int, default=5, help="timed steps per method (median reported)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--liger-eager", action="store_true", help="Liger without torch.compile")
    p.add_argument("--out", help="JSON path (default benchmarks/results/<device>-<date>-fused-linear-<shape>.json)")
    p.add_argument("--child-memory", choices=METHODS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve_shape(args) -> Shape:
    default = SHAPES[args.device + ("-quick" if args.quick else "")]
    dtype = args.dtype or default.dtype
    return parse_shape(args.shape, dtype) if args.shape else Shape(**{**asdict(default), "dtype": dtype})


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    shape = resolve_shape(args)
    liger_compiled = not args.liger_eager
    if args.child_memory:
        child_memory(args.child_memory, shape, device, liger_compiled)
        return {}

    inputs = make_inputs(shape, device)
    methods = {name: make_method(name, inputs, liger_compiled) for name in args.methods}
    missing = [name for name, step in methods.items() if step is None]
    methods = {name: step for name, step in methods.items() if step is not None}
    info = machine_info(device)
    print(f"machine: {describe_machine(info)}")
    print(f"shape: N={shape.rows}, H_s={shape.hidden_student}, H_t={shape.hidden_teacher}, V={shape.vocab}, "
          f"{shape.dtype}; divergence kl, batchmean, T=1" + (f"; not available: {missing}" if missing else ""))
    agreement = results_agree(methods)
    times = time_side_by_side(methods, args.runs, device)
    memory_method = ("fresh subprocess per method: VmHWM - VmRSS before one forward+backward, after a warm-up "
                     "and kdfast.empty_cache()" if device.type == "cpu" else
                     "torch.cuda.max_memory_allocated - memory_allocated before one forward+backward")
    peaks = {name: None if args.no_memory else peak_memory_in_subprocess(name, shape, device, liger_compiled)
             for name in methods}

    records = [{"method": name, "times_s": times[name], "median_s": statistics.median(times[name]),
                "peak_extra_bytes": peaks[name]} for name in methods]
    summary = summarise(records)
    payload = {"machine": info, "shape": asdict(shape), "divergence": "kl", "memory_method": memory_method,
               "liger": {"class": "LigerFusedLinearJSDLoss", "beta": 0.0, "chunk_size": 1024,
                         "compiled": liger_compiled} if "liger" in methods else None,
               "agreement": agreement, "records": records, "summary": summary,
               "finished": _dt.datetime.now().isoformat(timespec="seconds")}
    print_table(records, summary, memory_method)
    out = Path(args.out) if args.out else (ROOT / "benchmarks" / "results" /
                                           f"{device.type}-{_dt.date.today()}-fused-linear-{shape.label}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return payload


def summarise(records: list) -> dict:
    """kdfast's time and memory as fractions of the other methods', and the acceptance targets."""
    by = {r["method"]: r for r in records}
    if "kdfast" not in by:
        return {}
    ours = by["kdfast"]
    summary = {}
    for other in ("eager", "liger", "materialised", "kdfast_mm"):
        if other not in by:
            continue
        theirs = by[other]
        summary[f"time_vs_{other}"] = ours["median_s"] / theirs["median_s"]
        if ours["peak_extra_bytes"] is not None and theirs["peak_extra_bytes"]:
            summary[f"memory_vs_{other}"] = ours["peak_extra_bytes"] / theirs["peak_extra_bytes"]
    if "memory_vs_eager" in summary:
        summary["target_memory_at_most_20pct_of_eager"] = summary["memory_vs_eager"] <= MEMORY_TARGET
    if "time_vs_eager" in summary:
        summary["target_time_no_worse_than_eager"] = summary["time_vs_eager"] <= 1.0
    if "time_vs_liger" in summary:
        summary["target_better_than_liger"] = (summary["time_vs_liger"] < 1.0
                                               and summary.get("memory_vs_liger", 0.0) < 1.0)
    return summary


def print_table(records: list, summary: dict, memory_method: str) -> None:
    print(f"peak memory: {memory_method}")
    print(f"{'method':<8} {'median s':>9} {'min s':>8} {'peak extra MB':>14}")
    for r in records:
        peak = "-" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:.0f}"
        print(f"{r['method']:<8} {r['median_s']:>9.3f} {min(r['times_s']):>8.3f} {peak:>14}")
    for key, value in summary.items():
        print(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}")


if __name__ == "__main__":
    main()
