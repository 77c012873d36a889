"""The GPU session kit (benchmarks/gpu_session.sh, benchmarks/bench_gpu.py) and the device tests it runs.

* ``test_on_device_*``: fused linear, its process group of one rank and top-k
  on the session's device: CUDA tensors on a GPU (the session selects them with
  ``-k on_device``), CPU tensors through the Triton interpreter elsewhere.
* The dry run: ``gpu_session.sh --dry-run`` end to end on this CPU machine
  (every case reported, measured or skipped with a reason; the methods agree),
  and the GPU run's test selection (``--collect-only``), which no dry run parses.
* The pure functions of ``bench_gpu``: roofline, metrics, acceptance, budget,
  pytest's summary line; nothing is run for them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdfast
from kdfast.llm.fused_linear import fused_linear_distill_loss
from kdfast.llm.topk import topk_distill_loss

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif("triton" not in kdfast.available_backends(),
                                  reason="the Triton backend is not available here")


def _load(name):
    """A module of benchmarks/ (they import each other by their file names)."""
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("bench_gpu")


# ----------------------------------------------------------------- on the session's device
def _heads(rows=12, h_s=8, h_t=12, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(DEVICE)

    return (randn(rows, h_s).requires_grad_(), randn(vocab, h_s, scale=0.5).requires_grad_(),
            randn(rows, h_t), randn(vocab, h_t, scale=0.5))


def _value_and_grads(loss, inputs):
    return [loss.detach().double().cpu()] + [g.double().cpu() for g in torch.autograd.grad(loss, inputs)]


def _assert_all_close(got, want, rtol=1e-4):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))


@needs_triton
@pytest.mark.parametrize("options", [dict(divergence="kl", temperature=2.0), dict(divergence="jsd"),
                                     dict(divergence="tvd", weighting="wttm")], ids=lambda o: o["divergence"])
def test_on_device_fused_linear_triton_matches_the_materialised_loss(options):
    hs, ws, ht, wt = _heads()
    labels = torch.arange(hs.shape[0], device=DEVICE) % wt.shape[0]
    labels[::4] = -100
    got = _value_and_grads(fused_linear_distill_loss(hs, ws, ht, wt, labels, backend="triton", chunk_size=5,
                                                     hard_weight=0.5, **options), (hs, ws))
    want = _value_and_grads(kdfast.distill_loss(hs @ ws.T, ht @ wt.T, labels=labels, backend="torch", hard_weight=0.5,
                                                **options), (hs, ws))
    _assert_all_close(got, want)


@pytest.fixture
def one_rank_group(tmp_path):
    """A process group of this process alone: NCCL for CUDA tensors, gloo for CPU ones."""
    dist = pytest.importorskip("torch.distributed")
    backend = "nccl" if DEVICE.type == "cuda" and dist.is_nccl_available() else "gloo"
    if not dist.is_available() or (backend == "gloo" and not dist.is_gloo_available()):
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_on_device_fused_linear_with_a_process_group_of_one_rank(one_rank_group):
    hs, ws, ht, wt = _heads(seed=1)
    labels = torch.arange(hs.shape[0], device=DEVICE) % wt.shape[0]
    options = dict(divergence="jsd", hard_weight=0.3, weighting="entropy", chunk_size=None)
    got = _value_and_grads(fused_linear_distill_loss(hs, ws, ht, wt, labels, process_group=one_rank_group,
                                                     **options), (hs, ws))
    want = _value_and_grads(fused_linear_distill_loss(hs, ws, ht, wt, labels, **options), (hs, ws))
    _assert_all_close(got, want)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_on_device_topk_with_k_equal_to_V_is_the_dense_kernel(divergence):
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(6, 40, generator=g) * 2).to(DEVICE).requires_grad_()
    t = (torch.randn(6, 40, generator=g) * 2).to(DEVICE)
    logprobs, indices = torch.log_softmax(t, -1).topk(40, -1)
    got = _value_and_grads(topk_distill_loss(s, indices, logprobs, divergence=divergence, temperature=1.5), (s,))
    want = _value_and_grads(kdfast.distill_loss(s, t, divergence=divergence, temperature=1.5), (s,))
    _assert_all_close(got, want)


# ----------------------------------------------------------------- the dry run, end to end
def _run_dry(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *extra, str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-session")
    proc = _run_dry(out)
    report = json.loads((out / "gpu-session.json").read_text())
    return proc, out, report


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the dry run needs triton's interpreter")
def test_dry_run_passes_and_writes_its_few_files(dry_run):
    proc, out, report = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu-session.json", "gpu-session.md", "pytest.txt",
                                                     "session.log"]
    assert report["dry_run"] and report["finished"]
    assert report["tests"]["ok"] and report["tests"]["counts"]["passed"] >= 10
    assert "## Acceptance" in proc.stdout  # the summary is printed


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the dry run needs triton's interpreter")
def test_dry_run_reports_every_case_and_the_methods_agree(dry_run, bench):
    _, out, report = dry_run
    assert [c["id"] for c in report["cases"]] == [c.id for c in bench.gpu_cases()]
    markdown = (out / "gpu-session.md").read_text()
    for case in report["cases"]:
        assert case["id"] in markdown
        assert case["status"] == "measured", case
        for name, method in case["methods"].items():
            if method["status"] == "measured":
                assert method["runs"] == report["settings"]["runs"] and method["median_s"] > 0
            else:  # Liger on CPU tensors (or not installed): named, with why
                assert name == "liger" and method["status"] == "unavailable" and method["reason"]
        assert case["methods"]["kdfast"]["status"] == "measured"
        assert case["agreement"]["agree"], case["agreement"]
        assert case["metrics"]["time_ratio_kdfast_over_eager"] > 0
    assert {a["name"] for a in report["acceptance"]} == {c.name for c in bench.acceptance_checks()}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the dry run needs triton's interpreter")
def test_a_tiny_budget_marks_the_later_cases_skipped(tmp_path, bench):
    env = dict(os.environ, TRITON_INTERPRET="1", KDFAST_DISABLE_EXTENSION="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--dry-run", "--budget-s", "2",
                           "--out-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-session.json").read_text())
    cases = report["cases"]
    assert [c["id"] for c in cases] == [c.id for c in bench.gpu_cases()]
    assert all(c["status"] in ("measured", "skipped") for c in cases)
    skipped = [c for c in cases if c["status"] == "skipped"]
    assert cases[-1] in skipped and len(skipped) >= len(cases) - 2
    assert all("time budget" in c["reason"] for c in skipped)
    markdown = (tmp_path / "gpu-session.md").read_text()
    assert all(c["id"] in markdown for c in cases) and "skipped: time budget" in markdown
    assert {a["status"] for a in report["acceptance"]} <= {"not measured", "met", "missed"}


NEW_KERNEL_FILES = ["tests/test_ltkd_fused.py", "tests/test_grouped_kd.py", "tests/test_label_revision.py",
                    "tests/test_topk_triton.py", "tests/test_topk_teacher_triton.py"]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the Triton tests select nothing without it")
@pytest.mark.parametrize("dry", [False, True], ids=["gpu", "dry-run"])
def test_the_test_selection_parses_and_runs_the_new_kernels_before_the_matrix(dry):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(["bash", str(SCRIPT), "--collect-only", *(["--dry-run"] if dry else [])], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(dict.fromkeys(line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line))
    assert files[0] == "tests/test_gpu_session.py" and set(NEW_KERNEL_FILES) <= set(files)
    assert max(files.index(f) for f in NEW_KERNEL_FILES) < files.index("tests/test_backend_matrix.py")


# ----------------------------------------------------------------- the pure functions
def test_roofline_is_bytes_over_time_over_the_copy_bandwidth():
    from kdfast.bench.families import logits_bytes
    from kdfast.bench.machine import roofline_fraction

    bf16 = torch.empty(0, dtype=torch.bfloat16)
    moved = logits_bytes(8192, 128256, bf16, bf16)  # bf16: read both logits, write the gradient
    assert moved == 8192 * 128256 * 6
    assert roofline_fraction(moved, 2e-3, moved / 4e-3) == pytest.approx(2.0)
    assert roofline_fraction(moved, 1.0, None) is None


def _measured(ms, peak=None, value=1.0):
    return {"status": "measured", "median_s": ms / 1e3, "peak_bytes": peak, "value": value}


def test_case_metrics_ratios_speedups_and_bandwidth(bench):
    methods = {"kdfast": _measured(2.0, 100), "liger": _measured(5.0, 400), "compile": _measured(3.0),
               "eager": {"status": "oom", "error": "out of memory"}}
    m = bench.case_metrics(methods, bytes_moved=6e9, copy_bw=4e12)
    assert m["time_ratio_kdfast_over_liger"] == pytest.approx(0.4) and m["speedup_vs_liger"] == pytest.approx(2.5)
    assert m["time_ratio_kdfast_over_compile"] == pytest.approx(2 / 3)
    assert m["time_ratio_kdfast_over_eager"] is None and m["speedup_vs_eager"] is None
    assert m["peak_memory_ratio_vs_liger"] == pytest.approx(0.25)
    assert m["copy_bandwidth_fraction"] == pytest.approx(6e9 / 2e-3 / 4e12)


def test_value_agreement_is_relative_to_the_first_method(bench):
    a = bench.value_agreement({"kdfast": 2.0, "liger": 2.02, "eager": 2.0}, "bfloat16")
    assert a["relative_to"] == "kdfast" and a["max_rel_diff"] == pytest.approx(0.01) and a["agree"]
    assert not bench.value_agreement({"kdfast": 2.0, "eager": 2.02}, "float32")["agree"]
    assert bench.value_agreement({}, "float32")["agree"] is None


def _case(case_id, **metrics):
    return {"id": case_id, "status": "measured", "metrics": metrics}


def test_acceptance_reports_met_missed_by_how_much_and_not_measured(bench):
    big = "8192x128256-bfloat16"
    fused = f"fused_linear-{bench.FUSED_LINEAR_SHAPE.label}"
    cases = [_case(f"kl-{big}", speedup_vs_liger=2.5, copy_bandwidth_fraction=0.56),
             {"id": f"jsd-{big}", "status": "skipped", "reason": "time budget of 1 s spent", "metrics": {}},
             _case(fused, peak_memory_ratio_vs_liger=0.5, time_ratio_kdfast_over_liger=1.1)]
    results = {r["name"]: r for r in bench.evaluate_acceptance(cases)}
    kd_speed, kd_bw = results[f"KD {big}: >= 2x Liger-Kernel"], results[f"KD {big}: >= 70% of the copy bandwidth"]
    assert kd_speed["status"] == "met" and kd_speed["margin"] == pytest.approx(0.25)
    assert kd_bw["status"] == "missed" and kd_bw["margin"] == pytest.approx(-0.2)
    assert kd_bw["summary"].startswith("missed by 20%") and "56%" in kd_bw["summary"]
    jsd = results[f"JSD {big}: >= 2x Liger-Kernel"]
    assert jsd["status"] == "not measured" and "time budget" in jsd["summary"]
    assert results["fused linear: peak memory at or below Liger's"]["status"] == "met"
    time_check = results["fused linear: time at or below Liger's"]
    assert time_check["status"] == "missed" and time_check["margin"] == pytest.approx(-0.1)


def test_every_acceptance_check_names_a_case_of_the_run(bench):
    ids = [c.id for c in bench.gpu_cases()]
    assert len(ids) == len(set(ids))
    assert {c.case_id for c in bench.acceptance_checks()} <= set(ids)
    # acceptance cases first: a short budget still measures them
    assert ids[:3] == ["kl-8192x128256-bfloat16", "jsd-8192x128256-bfloat16",
                       "fused_linear-8192x2048-4096x128256-bfloat16"]
    # then the kernels no GPU has timed yet, before the cases earlier sessions measured
    assert [i.split("-")[0] for i in ids[3:7]] == ["ltkd", "grouped_kd", "label_revision", "topk"]
    topk = bench.gpu_cases()[6]
    assert topk.tail == "bucket" and topk.topk <= bench.DRY_LOSS_SHAPE[1]  # a dry run's teacher has its k entries
    assert all(bench.dry_run_case(c).id == c.id and bench.dry_run_case(c).N <= 16 for c in bench.gpu_cases())


def test_budget_skips_what_would_not_fit():
    bench = _load("bench_gpu")
    now = [0.0]
    budget = bench.Budget(100, clock=lambda: now[0])
    assert budget.skip_reason("loss") is None
    now[0] = 30
    budget.record("loss", 30)
    assert budget.skip_reason("loss") is None  # 70 s left, a loss case took 30 s
    now[0] = 80
    assert "a loss case took 30 s" in budget.skip_reason("loss")
    assert budget.skip_reason("fused_linear") is None and budget.stop_reason() is None  # never seen: no estimate
    now[0] = 100
    assert "spent" in budget.stop_reason() and "spent" in budget.skip_reason("fused_linear")


def test_pytest_summary_line_is_parsed(bench):
    text = "....s\n[100%]\n=========== 1100 passed, 3 skipped, 4538 deselected in 141.20s (0:02:21) ===========\n"
    summary = bench.pytest_summary(text)
    assert summary["counts"] == {"passed": 1100, "skipped": 3, "deselected": 4538}
    assert summary["line"].startswith("1100 passed")
    assert bench.pytest_summary("collecting ...\n")["line"] is None
    q = bench.pytest_summary("2 failed, 10 passed in 3.1s\n")
    assert q["counts"] == {"failed": 2, "passed": 10}


def test_a_check_without_its_method_says_why(bench):
    case = {"id": "kl-8192x128256-bfloat16", "status": "measured", "metrics": {"speedup_vs_liger": None},
            "methods": {"kdfast": _measured(1.0), "liger": {"status": "oom", "error": "out of memory"}}}
    check = bench.acceptance_checks()[0]
    assert bench.evaluate_check(check, case)["summary"] == "not measured: liger oom: out of memory"
    assert "case not in the run" in bench.evaluate_check(check, None)["summary"]
