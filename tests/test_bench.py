"""``kdfast bench`` (kdfast/bench/): cases, side-by-side timing, ratios, memory, files, ``--compare``, the CLI.

Timings are never asserted (a test machine's speed is not a result); what is
asserted is the structure: every method of every case timed the same number
of times in every phase, the same loss value everywhere, a speed-up against
every baseline, the files written where asked.  torch.compile runs with the
``aot_eager`` backend (tracing without inductor's code generation, seconds per
graph on 2 cores).
"""

import json
from pathlib import Path

import pytest
import torch

from conftest import FUSED_BACKENDS
from kdfast.bench import families, report, runner
from kdfast.bench.cli import main as bench_main, parse_shape
from kdfast.bench.families import Case, Settings
from kdfast.cli import main as kdfast_main

needs_cpu_kernels = pytest.mark.skipif("cpu" not in FUSED_BACKENDS, reason="the C++ extension is not built")
CPU = Settings(device="cpu", compile_backend="aot_eager", baselines=("eager", "compile"))
TINY = ["--runs", "2", "--compile-backend", "aot_eager", "--dtypes", "float32", "--no-progress"]


def _measured(records):
    return [r for r in records if "phases" in r]


@needs_cpu_kernels
@pytest.mark.parametrize("loss", families.LOSSES)
def test_every_loss_runs_every_method_in_every_phase_with_one_value(loss):
    settings = Settings(**{**CPU.__dict__, "backends": ("cpu", "torch"), "baselines": families.BASELINES})
    records = runner.run_case(Case(loss, 8, 40, "float32"), settings, runs=2, warmup=0, bandwidth=1e10)
    by = {r["method"]: r for r in records}
    if families.default_backend(families.family_of(loss), torch.device("cpu")) == "cpu":
        kdfast_methods = {"kdfast", "kdfast[torch]"}
    else:  # a loss without a C++ kernel (grouped_kd, label_revision): "kdfast" is its reference, the cpu backend
        # is not offered
        kdfast_methods = {"kdfast"}
        assert "skipped" in by["kdfast[cpu]"]
    assert {"eager", "compile"} | kdfast_methods <= set(by)
    for r in _measured(records):
        assert set(r["phases"]) == set(runner.PHASES)
        for summary in r["phases"].values():
            assert len(summary["times_s"]) == 2 and summary["median_s"] > 0 and summary["spread"] >= 0
        assert r["value_rel_diff"] < 1e-5, (r["method"], r["value"])  # every method computes the same loss
        assert r["kind"] == ("kdfast" if r["method"].startswith("kdfast") else "baseline")
    if loss.startswith("fused_linear"):  # matmul-bound: no memory roofline
        assert by["kdfast"]["bytes_moved"] is None and by["kdfast"]["roofline_fraction"] is None
    else:
        assert by["kdfast"]["roofline_fraction"] > 0
    if loss in families.TOPK_FAMILIES:  # the settings' tail and k name the case; k = 64 > V is all of V
        assert all((r["tail"], r["topk"]) == ("renormalize", 40) for r in records)
    if loss != "fused_linear":  # Liger's chunked fused linear loss runs on CPU too, when installed
        assert "skipped" in by["liger"]  # on CPU: Liger's divergence kernels are CUDA-only, or it has none


def test_ratios_are_baseline_over_kdfast_for_every_phase():
    def rec(method, seconds):
        return {"loss": "kl", "shape": "2x3", "dtype": "float32", "method": method, "kind": runner.kind_of(method),
                "phases": {p: {"median_s": seconds} for p in runner.PHASES}}

    rows = runner.ratios([rec("eager", 6.0), rec("compile", 3.0), rec("kdfast", 1.5), rec("kdfast[torch]", 3.0)])
    got = {(r["method"], r["baseline"]): r["forward_backward"] for r in rows}
    assert got == {("kdfast", "eager"): 4.0, ("kdfast", "compile"): 2.0, ("kdfast[torch]", "eager"): 2.0,
                   ("kdfast[torch]", "compile"): 1.0}
    assert all(r["forward"] == r["backward"] == r["forward_backward"] for r in rows)


def _run_kl_with_eager(monkeypatch, replace_eager, runs):
    """The records of a kl case whose eager baseline is ``replace_eager(real eager)``, beside kdfast[torch]."""
    real = families._prepare_distill

    def patched(*args):
        prepared = real(*args)
        prepared["baselines"]["eager"] = replace_eager(prepared["baselines"]["eager"])
        return prepared

    monkeypatch.setitem(families._PREPARE, "distill", patched)
    records = runner.run_case(Case("kl", 4, 30, "float32"), Settings(baselines=("eager",), backends=("torch",)),
                              runs=runs, warmup=0)
    return {r["method"]: r for r in records}


def test_a_failing_method_is_recorded_and_the_others_still_run(monkeypatch):
    def boom():
        raise RuntimeError("boom")

    by = _run_kl_with_eager(monkeypatch, lambda eager: boom, runs=1)
    assert by["eager"]["error"] == "RuntimeError: boom" and "phases" not in by["eager"]
    assert by["kdfast[torch]"]["phases"]["forward_backward"]["median_s"] > 0


def test_a_method_failing_only_while_timed_loses_its_numbers_not_the_run(monkeypatch):
    calls = {"n": 0}

    def failing_later(eager):
        def sometimes():
            calls["n"] += 1
            if calls["n"] > 2:  # the value and the warm-up pass, then it fails
                raise torch.OutOfMemoryError("no memory")
            return eager()

        return sometimes

    by = _run_kl_with_eager(monkeypatch, failing_later, runs=2)
    assert by["eager"]["error"] == "out of memory" and "phases" not in by["eager"]
    assert len(by["kdfast[torch]"]["phases"]["backward"]["times_s"]) == 2


def test_fast_methods_get_an_untimed_call_at_the_start_of_each_turn(monkeypatch):
    """A method faster than SETTLE_BELOW_S is called once untimed before each timed call; a slow one is not,
    and the turns stay in rotation (slow, fast-settle, fast-timed, slow, ...)."""
    monkeypatch.setattr(runner, "SETTLE_BELOW_S", 0.5)
    calls = []

    def step(name, seconds):
        def timed():
            calls.append(name)
            return seconds
        return timed

    steps = {"slow": step("slow", 2.0), "fast": step("fast", 0.1)}
    records = {"slow": {}, "fast": {}}
    times = runner._time_side_by_side(steps, runs=3, warmup=1, device="cpu", records=records)
    assert times == {"slow": [2.0] * 3, "fast": [0.1] * 3}
    assert calls == ["slow", "fast"] + ["slow", "fast", "fast"] * 3
    assert records == {"slow": {"settled": False}, "fast": {"settled": True}}


def test_a_method_failing_in_its_untimed_call_is_dropped_with_its_error(monkeypatch):
    monkeypatch.setattr(runner, "SETTLE_BELOW_S", 0.5)
    calls = {"n": 0}

    def fails_second_time():
        calls["n"] += 1
        if calls["n"] == 2:  # the first turn's untimed call
            raise torch.OutOfMemoryError("no memory")
        return 0.1

    records = {"fast": {"phases": {}}, "other": {}}
    times = runner._time_side_by_side({"fast": fails_second_time, "other": lambda: 0.2}, runs=2, warmup=1,
                                      device="cpu", records=records)
    assert times == {"other": [0.2, 0.2]} and calls["n"] == 2
    assert records["fast"]["error"] == "out of memory" and "phases" not in records["fast"]


def test_unknown_names_and_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="unknown loss 'kll'"):
        families.family_of("kll")
    with pytest.raises(ValueError, match="unknown baseline"):
        families.prepare(Case("kl", 2, 3, "float32"), Settings(baselines=("pytorch",)))
    for text in ("4096", "4096x", "ax3", "0x10", "4x1"):
        with pytest.raises(ValueError, match="NxV|at least"):
            parse_shape(text)
    assert parse_shape("4096X32000") == (4096, 32000)


def test_triton_on_a_cpu_without_the_interpreter_is_not_offered(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    prepared = families.prepare(Case("kl", 2, 5, "float32"), Settings(baselines=(), backends=("triton",)))
    assert "kdfast[triton]" in prepared.unavailable and not prepared.methods


def test_memory_in_process_measures_at_least_the_gradient():
    records = runner.run_case(Case("kl", 64, 1000, "float32"), Settings(baselines=("eager",), backends=("torch",)),
                              runs=1, warmup=0, phases=("forward_backward",), memory="in-process")
    for r in _measured(records):
        assert r["peak_extra_bytes"] >= 64 * 1000 * 4  # the gradient, at least


@needs_cpu_kernels
def test_memory_in_a_fresh_subprocess_per_method():
    records = runner.run_case(Case("kl", 64, 1000, "float32"), Settings(baselines=("eager",)), runs=1, warmup=0,
                              phases=("forward_backward",))
    runner.measure_in_subprocesses(records, Settings(baselines=("eager",)), threads=1, progress=False)
    by = {r["method"]: r for r in records}
    assert by["kdfast"]["peak_extra_bytes"] >= 64 * 1000 * 4
    # the plain loss keeps its float32 soft-maxes for the backward: more than the fused kernel's gradient
    assert by["eager"]["peak_extra_bytes"] > by["kdfast"]["peak_extra_bytes"]


def test_missing_ratios_names_the_case_and_the_baseline():
    rec = {"loss": "kl", "shape": "2x3", "dtype": "float32", "phases": {}}
    payload = {"records": [dict(rec, method="eager"), dict(rec, method="kdfast")],
               "ratios": [{"loss": "kl", "shape": "2x3", "dtype": "float32", "method": "kdfast", "baseline": "eager",
                           "forward_backward": None}]}
    assert report.missing_ratios(payload) == ["kl 2x3 float32: no ratio of kdfast against eager"]
    payload["ratios"][0]["forward_backward"] = 2.0
    assert report.missing_ratios(payload) == []
    payload["records"].pop()
    assert report.missing_ratios(payload) == ["kl 2x3 float32: kdfast did not run"]


@needs_cpu_kernels
def test_kdfast_bench_writes_json_and_plots_where_asked_and_compares(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory (or the package)
    out = tmp_path / "out"
    args = ["bench", "--losses", "kl", "dkd", "topk", "--shapes", "8x40,8x90", "--memory", "in-process",
            "--out", str(out), *TINY]
    assert kdfast_main(args) == 0
    files = sorted(p.name for p in out.iterdir())
    assert [f for f in files if f.endswith(".json")] and any(f.endswith("-roofline.png") for f in files)
    assert any(f.endswith("-time-vs-vocab.png") for f in files)
    assert list(tmp_path.iterdir()) == [out]
    (json_path,) = out.glob("*.json")
    payload = json.loads(json_path.read_text())
    assert payload["benchmark"] == "kdfast bench" and payload["schema"] == 1
    assert payload["settings"]["shapes"] == ["8x40", "8x90"] and payload["settings"]["runs"] == 2
    assert payload["machine"]["copy_bandwidth_GBps"] > 0 and payload["machine"]["device"] == "cpu"
    assert report.missing_ratios(payload) == []
    assert {(r["loss"], r["shape"]) for r in payload["ratios"]} == {(l, s) for l in ("kl", "dkd", "topk")
                                                                    for s in ("8x40", "8x90")}
    printed = capsys.readouterr().out
    assert "speed-up of kdfast" in printed and "kdfast vs eager" in printed and "# wrote" in printed

    # --compare: the same cases again, as ratios of the old times
    new_out = tmp_path / "again"
    assert kdfast_main(["bench", "--compare", str(json_path), "--out", str(new_out), "--no-plots",
                        "--no-progress"]) == 0
    (again,) = new_out.glob("*.json")
    redo = json.loads(again.read_text())
    assert [(r["loss"], r["shape"], r["dtype"], r["method"]) for r in redo["records"]] == \
        [(r["loss"], r["shape"], r["dtype"], r["method"]) for r in payload["records"]]
    rows = redo["compare"]["rows"]
    assert rows and {r["verdict"] for r in rows} <= {"regression", "improvement", "same"}
    assert {(r["loss"], r["method"]) for r in rows} >= {("kl", "kdfast"), ("dkd", "eager"), ("topk", "compile")}
    assert "REGRESSION" in capsys.readouterr().out or all(r["verdict"] != "regression" for r in rows)


def test_quick_is_the_documented_case_list_and_explicit_options_win(monkeypatch):
    from kdfast.bench import cli

    parser = __import__("argparse").ArgumentParser()
    cli.add_arguments(parser)
    cases, settings, options = cli.resolve(parser.parse_args(["--quick"]))
    assert [(c.loss, c.shape, c.dtype) for c in cases] == [(l, s, "float32") for l, s in cli.QUICK_CASES]
    assert options["runs"] == 3 and options["memory"] == "in-process"
    assert {c.family for c in cases} == {"distill", "dkd", "topk", "fused_linear"}
    cases, _, options = cli.resolve(parser.parse_args(["--quick", "--losses", "jsd", "--runs", "5",
                                                       "--memory", "off"]))
    assert {c.loss for c in cases} == {"jsd"} and {c.shape for c in cases} == {"256x2048", "256x8192"}
    assert options["runs"] == 5 and options["memory"] == "off"
    cases, _, _ = cli.resolve(parser.parse_args(["--classification", "--losses", "kl"]))
    assert [c.shape for c in cases if c.dtype == "float32"] == cli.CLASSIFICATION_SHAPES


def test_bench_errors_are_one_line_messages(tmp_path, capsys):
    assert bench_main(["--shapes", "12", "--out", str(tmp_path)]) == 2
    assert "kdfast bench: error: a shape is NxV" in capsys.readouterr().err
    assert kdfast_main(["bench", "--losses", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown loss 'nope'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert kdfast_main(["bench", "--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
    assert kdfast_main(["bench", "--compare", str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 2
    assert "no kdfast bench result at" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_repository_script_is_the_same_engine_with_results_in_the_checkout():
    import runpy

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_losses.py"
    module = runpy.run_path(str(script), run_name="not_main")
    assert module["main"] is bench_main and module["RESULTS"] == script.parent / "results"


def test_the_engine_needs_nothing_outside_the_package(tmp_path):
    """From a folder that is not the checkout, every module of kdfast.bench imports and --help runs."""
    import subprocess
    import sys

    code = ("import importlib, pkgutil, sys, kdfast.bench as b\n"
            "[importlib.import_module(f'kdfast.bench.{m.name}') for m in pkgutil.iter_modules(b.__path__)"
            " if m.name != '__main__']\n"
            "assert not [m for m in sys.modules if m.startswith(('benchmarks', 'bench_', 'plain_pytorch'))]\n")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
    help_text = subprocess.run([sys.executable, "-m", "kdfast.bench", "--help"], cwd=tmp_path, check=True,
                               capture_output=True, text=True).stdout
    assert "--compare" in help_text and "--quick" in help_text
