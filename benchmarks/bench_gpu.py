"""The GPU acceptance benchmark: kdfast against Liger-Kernel, torch.compile and eager PyTorch, in one process.

Run by ``benchmarks/gpu_session.sh`` (which first runs the Triton tests and
passes their log here); on its own::

    python benchmarks/bench_gpu.py --out-dir OUT [--budget-s 300]     # an H100/H200
    TRITON_INTERPRET=1 python benchmarks/bench_gpu.py --dry-run --out-dir OUT   # CPU, tiny shapes

Cases, most important first (the time budget may not reach the last ones):

* ``distill_loss`` kl, jsd (beta 0.5), reverse_kl, tvd and wttm
  (``kdfast.wttm_loss``) at 8192x128256 in bfloat16 and float32, and at
  4096x32000 float32: kdfast's Triton kernel, Liger-Kernel's ``LigerKLDIVLoss``
  / ``LigerJSD`` / ``LigerTVDLoss`` where one exists, ``torch.compile`` of the
  plain PyTorch loss and the plain loss eager (``kdfast.bench``'s methods and
  plain forms, ``kdfast/bench/baselines.py``);
* DIST and DKD at 8192x32000 and 65536x1000 (kernel, compiled plain, eager plain);
* ``fused_linear_distill_loss`` at BT=8192, H_s=2048, H_t=4096, V=128256 bf16
  against Liger's ``LigerFusedLinearJSDLoss`` (beta 0: KL) and eager
  (materialised logits, plain KL), with the peak memory of each
  (``torch.cuda.max_memory_allocated``, reset before each method);
* fused LTKD (``kdfast.ltkd_loss``, 3 groups, batch prior), Grouped KD and KD
  with Label Revision at 4096x32000 float32 (the shape of the CPU results),
  and ``topk_distill_loss(tail="bucket")`` with a k = 64 teacher at
  8192x128256 bf16, each against ``torch.compile`` of its plain form and the
  plain form eager (``kdfast.bench``'s ``ltkd`` / ``grouped_kd`` /
  ``label_revision`` / ``topk`` families): measured right after the three
  acceptance cases (KD and JSD at 8192x128256 bf16, fused linear), as no GPU
  has timed them yet.

Times are medians of ``--runs`` forward+backward steps timed with CUDA events
(the same number for every method); the HBM roofline is the bytes one
forward+backward must move (read both logits, write the gradient) over the
device-to-device copy bandwidth measured in the same run.  Each case records
whether its methods agree in value (relative difference from the first one).

Writes ``gpu-session.json`` and ``gpu-session.md`` to ``--out-dir`` after every
case (a run stopped from outside keeps what it measured; the cases it did not
reach stay ``skipped``), and prints the markdown table at the end.  A method
that fails (out of memory, or anything else) is recorded, never fatal.  The
budget (``--budget-s``) is checked before each case (and each fused-linear
method): what is not started in time is reported ``skipped`` with the reason.

``--dry-run``: the same cases on CPU tensors with tiny shapes (8x300; fused
linear 16x32x48x300), kdfast's Triton kernels through the interpreter
(``TRITON_INTERPRET=1``), ``torch.compile`` with the ``aot_eager`` backend
(inductor's code generation costs seconds a graph on a small CPU; the tracing
is what can rot), 2 runs: the kit is exercised end to end without a GPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.metadata
import importlib.util
import json
import os
import re
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import kdfast  # noqa: E402
from bench_fused_linear import Shape, make_inputs, make_method, results_agree  # noqa: E402
from kdfast.bench import families  # noqa: E402
from kdfast.bench.machine import (copy_bandwidth, describe_machine, machine_info, nominal_bandwidth,  # noqa: E402
                                  roofline_copy_numel)
from kdfast.bench.memory import peak_memory_of  # noqa: E402
from kdfast.bench.runner import run_case as run_bench_case  # noqa: E402
from kdfast.bench.timing import time_runs  # noqa: E402

JSON_NAME = "gpu-session.json"
MARKDOWN_NAME = "gpu-session.md"
TEMPERATURE = 2.0
LLM_LOSSES = ("kl", "jsd", "reverse_kl", "tvd", "wttm")
LIGER_LOSSES = ("kl", "jsd", "tvd")
# Measured first, so that under the budget the other methods never crowd kdfast and Liger out.
LOSS_METHODS = ("kdfast", "liger", "compile", "eager")
FUSED_LINEAR_METHODS = ("kdfast", "liger", "eager")
FUSED_LINEAR_SHAPE = Shape(8192, 2048, 4096, 128256, "bfloat16")
DRY_LOSS_SHAPE = (8, 300)
DRY_FUSED_LINEAR_SHAPE = Shape(16, 32, 48, 300, "bfloat16")
# Relative value difference within which two methods "agree": float32 sums of 1e9
# terms in different orders; 16-bit inputs that Liger takes as bf16 log-softmaxes
# (8 significant bits) while the others accumulate float32.
AGREEMENT_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}
NOT_REACHED = "not reached: the run ended before this case"
INTERRUPTED = "started but not finished: the run was stopped (the session's time limit?) during this case"


# ----------------------------------------------------------------- the cases
@dataclass(frozen=True)
class Case:
    """One benchmark case; ``id`` names the GPU case even when a dry run shrinks the shape."""

    id: str
    kind: str  # "loss" (distill_loss, the correlation losses and the other kdfast.bench families) or "fused_linear"
    loss: str
    N: int
    V: int
    dtype: str
    hidden_student: int = 0
    hidden_teacher: int = 0
    tail: str | None = None  # the top-k case's tail and k (kdfast.bench's topk family); None elsewhere
    topk: int | None = None

    def shape(self) -> Shape:
        return Shape(self.N, self.hidden_student, self.hidden_teacher, self.V, self.dtype)


def _loss_case(loss: str, N: int, V: int, dtype: str) -> Case:
    return Case(f"{loss}-{N}x{V}-{dtype}", "loss", loss, N, V, dtype)


def _topk_case(tail: str, k: int, N: int, V: int, dtype: str) -> Case:
    return Case(f"topk-{tail}-k{k}-{N}x{V}-{dtype}", "loss", "topk", N, V, dtype, tail=tail, topk=k)


def gpu_cases() -> list:
    """Every case of the acceptance run, in the order they are measured (acceptance cases first)."""
    big = [(8192, 128256, "bfloat16"), (8192, 128256, "float32"), (4096, 32000, "float32")]
    cases = [_loss_case("kl", *big[0]), _loss_case("jsd", *big[0])]
    s = FUSED_LINEAR_SHAPE
    cases.append(Case(f"fused_linear-{s.label}", "fused_linear", "kl", s.rows, s.vocab, s.dtype,
                      s.hidden_student, s.hidden_teacher))
    # the kernels no GPU has timed yet, before the cases earlier sessions measured
    cases += [_loss_case(loss, 4096, 32000, "float32") for loss in ("ltkd", "grouped_kd", "label_revision")]
    cases.append(_topk_case("bucket", 64, *big[0]))
    cases += [_loss_case(loss, *shape) for shape in big for loss in LLM_LOSSES
              if _loss_case(loss, *shape) not in cases]
    cases += [_loss_case(loss, N, V, "float32") for loss in ("dist", "dkd") for N, V in ((8192, 32000), (65536, 1000))]
    return cases


def dry_run_case(case: Case) -> Case:
    """The case with its tiny dry-run shape (same id, loss and dtype)."""
    if case.kind == "fused_linear":
        s = DRY_FUSED_LINEAR_SHAPE
        return replace(case, N=s.rows, V=s.vocab, hidden_student=s.hidden_student, hidden_teacher=s.hidden_teacher)
    return replace(case, N=DRY_LOSS_SHAPE[0], V=DRY_LOSS_SHAPE[1])


def expected_methods(case: Case) -> tuple:
    """The methods a case compares, in the order they run (Liger only where it has the loss)."""
    if case.kind == "fused_linear":
        return FUSED_LINEAR_METHODS
    return tuple(m for m in LOSS_METHODS if m != "liger" or case.loss in LIGER_LOSSES)


# ----------------------------------------------------------------- pure evaluation
def ratio(ours: float | None, theirs: float | None) -> float | None:
    """``ours / theirs`` (below 1: kdfast is faster / smaller), None when either is missing (or theirs is 0)."""
    return ours / theirs if ours is not None and theirs else None


def case_metrics(methods: dict, bytes_moved: int | None, copy_bw: float | None) -> dict:
    """kdfast's time and memory ratios to each other method, speed-ups, and its fraction of the copy bandwidth."""
    med = {m: r.get("median_s") for m, r in methods.items()}
    peak = {m: r.get("peak_bytes") for m, r in methods.items()}
    metrics = {}
    for other in methods:
        if other == "kdfast":
            continue
        slower = ratio(med.get("kdfast"), med.get(other))
        metrics[f"time_ratio_kdfast_over_{other}"] = slower
        metrics[f"speedup_vs_{other}"] = 1 / slower if slower else None
        metrics[f"peak_memory_ratio_vs_{other}"] = ratio(peak.get("kdfast"), peak.get(other))
    metrics["copy_bandwidth_fraction"] = (bytes_moved / med["kdfast"] / copy_bw
                                          if bytes_moved and copy_bw and med.get("kdfast") else None)
    return metrics


def value_agreement(values: dict, dtype: str) -> dict:
    """Whether the measured methods' loss values agree: relative differences from the first one."""
    present = {m: v for m, v in values.items() if v is not None}
    if not present:
        return {"relative_to": None, "agree": None, "max_rel_diff": None, "tolerance": None, "rel_diff": {}}
    base_name, base = next(iter(present.items()))
    diffs = {m: abs(v - base) / max(abs(base), 1e-30) for m, v in present.items()}
    tol = AGREEMENT_TOLERANCE.get(dtype, 1e-4)
    worst = max(diffs.values())
    return {"relative_to": base_name, "rel_diff": diffs, "max_rel_diff": worst, "tolerance": tol,
            "agree": worst <= tol}


@dataclass(frozen=True)
class Check:
    """An acceptance target on one metric of one case: ``metric op target``."""

    name: str
    case_id: str
    metric: str
    op: str  # ">=" or "<="
    target: float


def acceptance_checks() -> list:
    """The issue's targets: KD and JSD at 8192x128256 bf16 >= 2x Liger and >= 70% of the copy bandwidth;
    the fused linear loss at or below Liger's peak memory and time."""
    big = "8192x128256-bfloat16"
    fused = f"fused_linear-{FUSED_LINEAR_SHAPE.label}"
    checks = []
    for loss, label in (("kl", "KD"), ("jsd", "JSD")):
        checks.append(Check(f"{label} {big}: >= 2x Liger-Kernel", f"{loss}-{big}", "speedup_vs_liger", ">=", 2.0))
        checks.append(Check(f"{label} {big}: >= 70% of the copy bandwidth", f"{loss}-{big}",
                            "copy_bandwidth_fraction", ">=", 0.70))
    checks.append(Check("fused linear: peak memory at or below Liger's", fused, "peak_memory_ratio_vs_liger", "<=",
                        1.0))
    checks.append(Check("fused linear: time at or below Liger's", fused, "time_ratio_kdfast_over_liger", "<=", 1.0))
    return checks


def evaluate_check(check: Check, case: dict | None) -> dict:
    """met / missed (with the relative margin: positive met by, negative missed by) / not measured (why)."""
    out = asdict(check)
    value = (case or {}).get("metrics", {}).get(check.metric)
    if value is None:
        why = ("case not in the run" if case is None else case.get("reason") if case.get("status") == "skipped"
               else _why_not_measured(check.metric, case.get("methods", {})))
        return dict(out, status="not measured", value=None, margin=None, summary=f"not measured: {why}")
    margin = (value - check.target) / check.target if check.op == ">=" else (check.target - value) / check.target
    met = margin >= 0
    return dict(out, status="met" if met else "missed", value=value, margin=margin,
                summary=f"{'met' if met else 'missed'} by {abs(margin) * 100:.0f}% "
                        f"({_fmt_metric(check.metric, value)} vs target {check.op} "
                        f"{_fmt_metric(check.metric, check.target)})")


def _why_not_measured(metric: str, methods: dict) -> str:
    """The reason of the first method a metric needs (kdfast, and the one it compares with) that has no time."""
    other = re.split(r"_(?:vs|over)_", metric)[-1]
    for name in ("kdfast", other):
        entry = methods.get(name) or {}
        if entry.get("status") != "measured":
            return f"{name} {entry.get('status', 'absent')}: {entry.get('reason') or entry.get('error') or '-'}"
    return f"{metric} could not be computed"


def evaluate_acceptance(cases: list) -> list:
    """Every acceptance check against the case (JSON) it names."""
    by_id = {c["id"]: c for c in cases}
    return [evaluate_check(check, by_id.get(check.case_id)) for check in acceptance_checks()]


def _fmt_metric(metric: str, value: float) -> str:
    """A metric as the summary shows it: speed-ups as ``2.10x``, fractions of bandwidth in %, ratios plain."""
    if metric.startswith("speedup"):
        return f"{value:.2f}x"
    if metric == "copy_bandwidth_fraction":
        return f"{value * 100:.0f}%"
    return f"{value:.2f}"


# ----------------------------------------------------------------- budget
class Budget:
    """A deadline for starting work, with the durations of the cases so far to predict the next one."""

    def __init__(self, seconds: float, clock=time.monotonic):
        self.seconds = seconds
        self.clock = clock
        self.deadline = clock() + seconds
        self.durations = {}  # kind -> [seconds of each finished case]

    def remaining(self) -> float:
        return self.deadline - self.clock()

    def stop_reason(self) -> str | None:
        """Why no more work may start, or None."""
        return None if self.remaining() > 0 else f"time budget of {self.seconds:.0f} s spent"

    def skip_reason(self, kind: str) -> str | None:
        """Why a case of ``kind`` should not start: the budget is spent, or less is left than such a case took."""
        spent = self.stop_reason()
        if spent:
            return spent
        past = self.durations.get(kind)
        expected = statistics.mean(past) if past else 0.0
        if expected > self.remaining():
            return (f"time budget: {self.remaining():.0f} s of {self.seconds:.0f} s left, "
                    f"a {kind} case took {expected:.0f} s")
        return None

    def record(self, kind: str, seconds: float) -> None:
        self.durations.setdefault(kind, []).append(seconds)


# ----------------------------------------------------------------- tests log
def pytest_summary(text: str) -> dict:
    """Counts of pytest's last summary line (``3 passed, 1 skipped in 2.5s``) and the line itself."""
    lines = [ln.strip("= ").strip() for ln in text.splitlines()
             if re.search(r"\d+ (passed|failed|error|errors|skipped|deselected)\b", ln) and " in " in ln]
    if not lines:
        return {"line": None, "counts": {}}
    line = lines[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|"
                                                    r"xpassed|warnings?)", line)}
    return {"line": line, "counts": counts}


def tests_record(log: str | None, exit_code: int | None, cap_s: float | None) -> dict | None:
    """The report's ``tests`` entry: pytest's summary of the session's log, its exit code (124: capped)."""
    if log is None:
        return None
    path = Path(log)
    text = path.read_text(errors="replace") if path.exists() else ""
    capped = exit_code == 124
    return dict(pytest_summary(text), log=path.name, exit_code=exit_code, cap_s=cap_s, stopped_at_cap=capped,
                ok=exit_code == 0)


# ----------------------------------------------------------------- running the cases
@dataclass
class Context:
    """What every case of one run shares: device, runs, budget, bandwidths, compile backend."""

    device: torch.device
    runs: int
    budget: Budget
    copy_bw: float
    nominal_bw: float | None
    compile_backend: str
    dry_run: bool


def _unavailable_reason(method: str, case: Case, device: torch.device) -> str:
    """Why a method of the case could not be built here."""
    if method == "liger":
        if device.type != "cuda" and case.kind != "fused_linear":
            return "Liger-Kernel's losses run on CUDA only"
        return "liger-kernel is not importable (carry its wheel in .whl/, see gpu_session.sh)"
    if method == "kdfast":
        return "kdfast's triton backend is not available here"
    return "not available"


def _method_entry(record: dict) -> dict:
    """The JSON of one method of a loss case, from its ``kdfast.bench`` record (forward+backward)."""
    if "skipped" in record:
        return {"status": "unavailable", "reason": record["skipped"]}
    if "error" in record:
        return {"status": "oom" if record["error"] == "out of memory" else "error", "error": record["error"]}
    both = record["phases"]["forward_backward"]
    return {"status": "measured", "median_s": both["median_s"], "runs": len(both["times_s"]),
            "times_s": both["times_s"], "peak_bytes": record["peak_extra_bytes"], "value": record["value"]}


def run_loss_case(case: Case, ctx: Context) -> dict:
    """A ``distill_loss`` / DIST / DKD / LTKD / Grouped KD / Label Revision / top-k case through ``kdfast.bench``'s
    runner (kdfast's Triton backend)."""
    settings = families.Settings(device=str(ctx.device), temperature=TEMPERATURE,
                                 baselines=tuple(m for m in expected_methods(case) if m != "kdfast"),
                                 backends=("triton",), compile_backend=ctx.compile_backend)
    records = run_bench_case(families.Case(case.loss, case.N, case.V, case.dtype, case.tail, case.topk), settings,
                             runs=ctx.runs, warmup=1, phases=("forward_backward",), bandwidth=ctx.copy_bw,
                             nominal=ctx.nominal_bw, memory="cuda" if ctx.device.type == "cuda" else "in-process")
    # on CPU tensors (the dry run) Triton is not the device's backend: its method is "kdfast[triton]"
    methods = {("kdfast" if r["kind"] == "kdfast" else r["method"]): _method_entry(r) for r in records}
    moved = next((r["bytes_moved"] for r in records if "bytes_moved" in r), None)
    return finish_case(case, methods, ctx, moved)


def run_fused_linear_case(case: Case, ctx: Context) -> dict:
    """``fused_linear_distill_loss`` vs Liger's chunked JSD (beta 0) vs eager, each method on its own."""
    inputs = make_inputs(case.shape(), ctx.device)
    steps = {name: make_method(name, inputs, liger_compiled=not ctx.dry_run, backend="triton")
             for name in FUSED_LINEAR_METHODS}
    methods, outputs = {}, {}
    for name, step in steps.items():
        reason = ctx.budget.stop_reason()
        if step is None or reason:
            methods[name] = ({"status": "skipped", "reason": reason} if reason else
                             {"status": "unavailable", "reason": _unavailable_reason(name, case, ctx.device)})
            continue
        try:
            out = step()
            times = time_runs(step, ctx.runs, 1, ctx.device)
            peak = peak_memory_of(step, ctx.device)
        except Exception as error:  # noqa: BLE001 - recorded, the other methods still run
            methods[name] = _fused_failure(error, ctx.device)
            continue
        outputs[name] = out
        methods[name] = {"status": "measured", "median_s": statistics.median(times), "runs": len(times),
                         "times_s": times, "peak_bytes": peak, "value": float(out[0])}
    result = finish_case(case, methods, ctx, None)
    if len(outputs) > 1:
        result["gradient_agreement"] = results_agree({n: (lambda o=o: o) for n, o in outputs.items()})
    return result


def _fused_failure(error: BaseException, device: torch.device) -> dict:
    """A failed fused-linear method's entry; out-of-memory frees the cache for the next method."""
    if isinstance(error, torch.OutOfMemoryError):
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"status": "oom", "error": "out of memory"}
    return {"status": "error", "error": f"{type(error).__name__}: {str(error).strip()[:300]}"}


def finish_case(case: Case, methods: dict, ctx: Context, moved: int | None) -> dict:
    """The case's JSON: its methods (unavailable ones named), metrics, value agreement and status."""
    for name in expected_methods(case):
        methods.setdefault(name, {"status": "unavailable", "reason": _unavailable_reason(name, case, ctx.device)})
    methods = {name: methods[name] for name in expected_methods(case)}
    measured = [m for m, r in methods.items() if r["status"] == "measured"]
    status = "measured" if measured else ("skipped" if all(r["status"] in ("skipped", "unavailable")
                                                          for r in methods.values()) else "failed")
    out = dict(asdict(case), status=status, methods=methods, bytes_moved=moved,
               metrics=case_metrics(methods, moved, ctx.copy_bw),
               agreement=value_agreement({m: methods[m].get("value") for m in measured}, case.dtype))
    if status == "skipped":
        out["reason"] = next((r["reason"] for r in methods.values() if r["status"] == "skipped"),
                             "no method available")
    return out


def skipped_case(case: Case, reason: str) -> dict:
    """A case that did not run (or has not finished), with why."""
    return dict(asdict(case), status="skipped", reason=reason, methods={}, metrics={}, agreement=None)


def run_case(case: Case, ctx: Context) -> dict:
    """Measure one case; its tensors are released before the next."""
    runner = run_fused_linear_case if case.kind == "fused_linear" else run_loss_case
    try:
        return runner(case, ctx)
    finally:
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------- report
def machine(device: torch.device, copy_bw: float, nominal_bw: float | None) -> dict:
    """``machine_info`` with the bandwidths, the versions (CUDA, triton, Liger-Kernel) and the GPU's properties."""
    info = machine_info(device)
    info.update(copy_bandwidth_GBps=copy_bw / 1e9, nominal_bandwidth_GBps=nominal_bw / 1e9 if nominal_bw else None,
                cuda=torch.version.cuda, triton=_version("triton"), liger_kernel=_version("liger-kernel"),
                kdfast_backends=kdfast.available_backends(), triton_interpret=os.environ.get("TRITON_INTERPRET"))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_memory_GiB=props.total_memory / 2**30, gpu_capability=f"{props.major}.{props.minor}")
    return info


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_report(report: dict, out_dir: Path) -> None:
    """Rewrite the JSON and the markdown (each through a temporary file, so a kill never leaves half a file)."""
    report["acceptance"] = evaluate_acceptance(report["cases"])
    for name, text in ((JSON_NAME, json.dumps(report, indent=1) + "\n"), (MARKDOWN_NAME, render_markdown(report))):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)


def _ms(method: dict | None) -> str:
    """A method's median in ms, or what became of it."""
    if not method:
        return "-"
    if method["status"] == "measured":
        return f"{method['median_s'] * 1e3:.2f}"
    return {"oom": "OOM", "error": "error", "skipped": "skipped", "unavailable": "n/a"}[method["status"]]


def _speedup(metrics: dict, other: str) -> str:
    value = metrics.get(f"speedup_vs_{other}")
    return f"{value:.2f}x" if value else "-"


def _peak(methods: dict, name: str) -> str:
    peak = (methods.get(name) or {}).get("peak_bytes")
    return f"{peak / 2**20:.0f}" if peak is not None else "-"


def render_markdown(report: dict) -> str:
    """The summary: machine and versions, tests, acceptance checks, one table row per case, failures."""
    m = report["machine"]
    title = m.get("gpu") or m["cpu"]
    lines = [f"# kdfast GPU session: {title}" + (" (dry run: CPU tensors, Triton interpreter, tiny shapes)"
                                                 if report["dry_run"] else ""), ""]
    lines.append(f"torch {m['torch']} (CUDA {m['cuda']}), triton {m['triton']}, Liger-Kernel {m['liger_kernel']}, "
                 f"kdfast {m['kdfast']}; copy bandwidth {m['copy_bandwidth_GBps']:.0f} GB/s"
                 + (f" (nominal {m['nominal_bandwidth_GBps']:.0f} GB/s)" if m.get("nominal_bandwidth_GBps") else "")
                 + f"; medians of {report['settings']['runs']} forward+backward runs per method "
                 f"({report['settings']['timer']}); T = {report['settings']['temperature']}.")
    lines.append(f"Budget {report['budget_s']:.0f} s, used {report['elapsed_s']:.0f} s"
                 + ("" if report.get("finished") else " (run not finished)") + ".")
    tests = report.get("tests")
    if tests:
        lines += ["", f"**Tests** ({tests['log']}): {tests['line'] or 'no summary line'}; exit code "
                      f"{tests['exit_code']}" + (f" (stopped at the {tests['cap_s']:.0f} s cap)"
                                                 if tests["stopped_at_cap"] else "")]
    else:
        lines += ["", "**Tests**: not run with this benchmark"]
    lines += ["", "## Acceptance", "", "| check | status |", "|---|---|"]
    lines += [f"| {a['name']} | {a['summary']} |" for a in report.get("acceptance", [])]
    lines += ["", "## Cases", "",
              "Times in ms; speed-up = the other method's time / kdfast's; % copy BW = bytes to move "
              "(read both logits, write the gradient) / kdfast's time / copy bandwidth.", "",
              "| case | N x V | kdfast | Liger | compile | eager | vs Liger | vs compile | vs eager | % copy BW "
              "| peak MiB kdfast / Liger / eager | values agree | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    failures = []
    for c in report["cases"]:
        meth, met = c.get("methods", {}), c.get("metrics", {})
        bw = met.get("copy_bandwidth_fraction")
        agree = c.get("agreement") or {}
        agree_cell = ("-" if agree.get("agree") is None else
                      f"{'yes' if agree['agree'] else 'NO'} ({agree['max_rel_diff']:.1e})")
        status = c["status"] if c["status"] != "skipped" else f"skipped: {c.get('reason')}"
        lines.append(f"| {c['id']} | {c['N']} x {c['V']} | " + " | ".join(_ms(meth.get(x)) for x in LOSS_METHODS)
                     + " | " + " | ".join(_speedup(met, x) for x in ("liger", "compile", "eager"))
                     + f" | {f'{bw * 100:.0f}%' if bw else '-'} | "
                     + " / ".join(_peak(meth, x) for x in ("kdfast", "liger", "eager"))
                     + f" | {agree_cell} | {status} |")
        failures += [f"- {c['id']} {name}: {r.get('error') or r.get('reason')}" for name, r in meth.items()
                     if r["status"] in ("oom", "error", "skipped")]
    if failures:
        lines += ["", "## Failed or skipped methods", ""] + failures
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------- driver
def parse_args(argv=None):
    """The command line (see the module doc)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", required=True, help="where gpu-session.json and gpu-session.md go")
    p.add_argument("--budget-s", type=float, default=300.0, help="no case or method starts after this many seconds")
    p.add_argument("--dry-run", action="store_true", help="CPU tensors, tiny shapes, Triton interpreter")
    p.add_argument("--runs", type=int, default=None, help="timed runs per method (default 20; dry run 2)")
    p.add_argument("--cases", nargs="*", default=None, help="only the cases whose id starts with one of these")
    p.add_argument("--tests-log", help="the pytest log of the session (summarised in the report)")
    p.add_argument("--tests-exit-code", type=int, help="pytest's exit code (124: stopped at the cap)")
    p.add_argument("--tests-cap-s", type=float, help="the time cap the tests ran under")
    return p.parse_args(argv)


def prepare_dry_run() -> None:
    """One intra-op thread (tiny shapes: fastest, and immune to a loaded machine) and the tests' interpreter speed-up.

    ``tests/triton_interpreter.py`` patches Triton's interpreter once per launch
    instead of once per device-function call; it changes no result.
    """
    torch.set_num_threads(1)
    # numpy's warnings from inside the interpreter (inf - inf on masked lanes) are not the kernels' results
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.")
    path = Path(__file__).resolve().parent.parent / "tests" / "triton_interpreter.py"
    spec = importlib.util.spec_from_file_location("triton_interpreter", path)
    if spec is None or not path.exists():
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.speed_up_interpreter()


def plan(args) -> list:
    """The cases of this run: all (or those ``--cases`` names), shrunk for a dry run."""
    cases = gpu_cases()
    if args.cases:
        cases = [c for c in cases if c.id.startswith(tuple(args.cases))]
    return [dry_run_case(c) for c in cases] if args.dry_run else cases


def main(argv=None) -> dict:
    """Measure every case within the budget, rewriting the report after each; returns the report."""
    started = time.monotonic()
    args = parse_args(argv)
    if args.dry_run and not kdfast.ops.triton.interpreter_requested():
        raise SystemExit("--dry-run runs kdfast's Triton kernels through the interpreter: set TRITON_INTERPRET=1 "
                         "before Python starts (gpu_session.sh --dry-run does)")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU (or --dry-run)")
    if args.dry_run:
        prepare_dry_run()
    device = torch.device("cpu" if args.dry_run else "cuda")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = plan(args)
    budget = Budget(args.budget_s)
    copy_bw = copy_bandwidth(roofline_copy_numel(max(c.N * c.V * 4 for c in cases)), device)
    ctx = Context(device=device, runs=args.runs or (2 if args.dry_run else 20), budget=budget, copy_bw=copy_bw,
                  nominal_bw=nominal_bandwidth(device), compile_backend="aot_eager" if args.dry_run else "inductor",
                  dry_run=args.dry_run)
    report = {"benchmark": "bench_gpu", "dry_run": args.dry_run,
              "started": _dt.datetime.now().isoformat(timespec="seconds"), "finished": None,
              "budget_s": args.budget_s, "elapsed_s": 0.0,
              "machine": machine(device, copy_bw, ctx.nominal_bw),
              "settings": {"runs": ctx.runs, "temperature": TEMPERATURE, "compile_backend": ctx.compile_backend,
                           "timer": "CUDA events" if device.type == "cuda" else "wall clock",
                           "agreement_tolerance": AGREEMENT_TOLERANCE},
              "tests": tests_record(args.tests_log, args.tests_exit_code, args.tests_cap_s),
              "cases": [skipped_case(c, NOT_REACHED) for c in cases]}
    print(f"# {describe_machine(report['machine'])}", flush=True)
    print(f"# copy bandwidth {copy_bw / 1e9:.1f} GB/s; {len(cases)} cases; budget {args.budget_s:.0f} s", flush=True)
    write_report(report, out_dir)
    for i, case in enumerate(cases):
        reason = budget.skip_reason(case.kind)
        if reason:
            report["cases"][i] = skipped_case(case, reason)
        else:
            report["cases"][i] = skipped_case(case, INTERRUPTED)
            write_report(report, out_dir)
            t0 = time.monotonic()
            report["cases"][i] = run_case(case, ctx)
            budget.record(case.kind, time.monotonic() - t0)
        report["elapsed_s"] = time.monotonic() - started
        print(f"#   {case.id}: {report['cases'][i]['status']} ({report['elapsed_s']:.0f} s)", flush=True)
        write_report(report, out_dir)
    report["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    report["elapsed_s"] = time.monotonic() - started
    write_report(report, out_dir)
    print(render_markdown(report))
    return report


if __name__ == "__main__":
    main()
