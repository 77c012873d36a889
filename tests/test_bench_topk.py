"""``kdfast bench``'s top-k cases (kdfast/bench/): a case per tail and k, the fused linear top-k loss, and
``benchmarks/bench_topk.py``, the acceptance run of top-k distillation.

As in test_bench.py, timings are never asserted, only the structure: which
cases a run has, how its records and ratios name them, that every method
computes the same loss.  Tiny shapes, ``torch.compile`` on ``aot_eager``.
"""

import json
import runpy
from pathlib import Path

import pytest

from conftest import FUSED_BACKENDS
from kdfast.bench import cli, keys, plots, report, runner
from kdfast.bench.compare import compare
from kdfast.bench.families import Case, Settings
from kdfast.bench.machine import machine_info
from kdfast.bench.memory import case_id
from kdfast.cli import main as kdfast_main

needs_cpu_kernels = pytest.mark.skipif("cpu" not in FUSED_BACKENDS, reason="the C++ extension is not built")
SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_topk.py"
TINY = ["--runs", "1", "--phases", "forward_backward", "--compile-backend", "aot_eager", "--dtypes", "float32",
        "--no-progress", "--no-plots"]


def _parser():
    parser = __import__("argparse").ArgumentParser()
    cli.add_arguments(parser)
    return parser


def _names(cases):
    return [(c.loss, c.shape, c.dtype, c.tail, c.topk) for c in cases]


# ----------------------------------------------------------------- settings and cases
def test_settings_hold_lists_of_k_and_tails_and_read_an_earlier_results_number():
    assert Settings().topk == (64,) and Settings().tails == ("renormalize",)
    assert Settings(topk=32, tails="bucket").topk == (32,) and Settings(tails="bucket").tails == ("bucket",)
    assert Settings.from_json({"topk": 64, "hidden": 16}).topk == (64,)  # a result from before the lists
    assert Settings.from_json({"topk": [4, 8], "tails": ["bucket"]}) == Settings(topk=(4, 8), tails=("bucket",))
    with pytest.raises(ValueError, match="unknown tail 'drop'"):
        Settings(tails=("renormalize", "drop"))
    with pytest.raises(ValueError, match="--topk"):
        Settings(topk=(0,))


def test_a_top_k_loss_has_a_case_per_tail_and_k_and_the_others_one():
    args = _parser().parse_args(["--losses", "topk", "fused_linear_topk", "kl", "--shapes", "8x64", "--topk", "4,8",
                                 "--tail", "renormalize", "bucket", "--dtypes", "float32"])
    cases, settings, _ = cli.resolve(args)
    assert settings.topk == (4, 8) and settings.tails == ("renormalize", "bucket")
    per_teacher = [(tail, k) for tail in ("renormalize", "bucket") for k in (4, 8)]
    assert _names(cases) == ([("topk", "8x64", "float32", t, k) for t, k in per_teacher]
                             + [("fused_linear_topk", "8x64", "float32", t, k) for t, k in per_teacher]
                             + [("kl", "8x64", "float32", None, None)])
    # a k past the vocabulary is all of it, once
    cases, _, _ = cli.resolve(_parser().parse_args(["--losses", "topk", "--shapes", "8x64", "--topk", "4", "64", "100",
                                                    "--dtypes", "float32"]))
    assert [c.topk for c in cases] == [4, 64]
    # the records name the case with its tail and k, a plain loss without them
    assert Case("topk", 8, 64, "float32", "bucket", 4).key()["tail"] == "bucket"
    assert "tail" not in Case("kl", 8, 64, "float32").key()
    assert Case("topk", 8, 64, "float32").complete(Settings(topk=(8,), tails=("bucket",))).key()["topk"] == 8


def test_bad_tails_and_ks_are_one_line_errors(tmp_path, capsys):
    assert kdfast_main(["bench", "--losses", "topk", "--tail", "drop", "--out", str(tmp_path)]) == 2
    assert "kdfast bench: error: unknown tail 'drop'" in capsys.readouterr().err
    assert kdfast_main(["bench", "--losses", "topk", "--topk", "64,many", "--out", str(tmp_path)]) == 2
    assert "--topk takes a list of ints" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------- the cases, run
@needs_cpu_kernels
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_both_tails_run_every_method_on_one_value(tail):
    settings = Settings(baselines=("eager", "compile"), backends=("cpu", "torch"), compile_backend="aot_eager")
    records = runner.run_case(Case("topk", 8, 64, "float32", tail, 4), settings, runs=1, warmup=0,
                              phases=("forward_backward",), bandwidth=1e10)
    by = {r["method"]: r for r in records}
    assert {(r["tail"], r["topk"]) for r in records} == {(tail, 4)}
    for name in ("eager", "compile", "kdfast[torch]"):  # the PyTorch form is always a method: today's implementation
        assert by[name]["value_rel_diff"] < 1e-5, (name, by[name])
    # kdfast's fused kernel, where the loss has one for this tail; else it is not run, with the loss's reason
    assert "phases" in by["kdfast"] or (tail == "bucket" and "bucket" in by["kdfast"]["skipped"])
    if "phases" in by["kdfast"]:
        assert by["kdfast"]["value_rel_diff"] < 1e-5
    # the least traffic: the gradient, the teacher's top-k, and the student logits that the tail reads
    read = 8 * 64 if tail == "bucket" else 8 * 4
    assert by["eager"]["bytes_moved"] == (read + 8 * 64) * 4 + 8 * 4 * (8 + 4)


@needs_cpu_kernels
def test_fused_linear_topk_runs_against_the_materialised_logits_and_measures_memory():
    settings = Settings(hidden=16, baselines=("eager", "compile", "liger"), backends=("cpu", "torch"),
                        compile_backend="aot_eager")
    records = runner.run_case(Case("fused_linear_topk", 8, 64, "float32", "bucket", 4), settings, runs=1, warmup=0,
                              phases=("forward_backward",), memory="in-process")
    by = {r["method"]: r for r in records}
    for name in ("eager", "compile", "kdfast"):
        assert by[name]["value_rel_diff"] < 1e-5 and by[name]["peak_extra_bytes"] is not None
        assert by[name]["bytes_moved"] is None  # matmul-bound: no memory roofline
    assert "top-k" in by["liger"]["skipped"]
    # the loss takes a backend= or says why kdfast[torch] is not offered
    assert "phases" in by["kdfast[torch]"] or "backend" in by["kdfast[torch]"]["skipped"]


@needs_cpu_kernels
def test_a_fresh_process_measures_the_memory_of_the_very_case():
    settings = Settings(baselines=(), backends=("torch",))
    records = runner.run_case(Case("topk", 32, 512, "float32", "bucket", 4), settings, runs=1, warmup=0,
                              phases=("forward_backward",))
    runner.measure_in_subprocesses(records, settings, threads=1, progress=False)
    (measured,) = [r for r in records if "phases" in r]
    assert measured["peak_extra_bytes"] >= 32 * 512 * 4  # the dense gradient, at least
    assert case_id(measured) == "topk[bucket,k=4]/32x512/float32"


# ----------------------------------------------------------------- ratios, table, plots, compare
def _record(method, tail, seconds, k=4):
    phase = {"median_s": seconds, "q1_s": seconds, "q3_s": seconds, "min_s": seconds, "spread": 0.0,
             "times_s": [seconds]}
    return {"loss": "topk", "family": "topk", "shape": "8x64", "N": 8, "V": 64, "dtype": "float32", "tail": tail,
            "topk": k, "method": method, "kind": runner.kind_of(method),
            "phases": {p: dict(phase) for p in runner.PHASES}, "peak_extra_bytes": None, "bytes_moved": 1000,
            "roofline_fraction": None, "nominal_roofline_fraction": None, "value": 1.0, "value_rel_diff": 0.0}


def _payload(records):
    return {"benchmark": "kdfast bench", "schema": 1, "created": "2026-11-30T02:10:00",
            "machine": dict(machine_info("cpu"), copy_bandwidth_GBps=20.0),
            "settings": {"runs": 1, "temperature": 2.0, "memory": "off", "phases": list(runner.PHASES),
                         "topk": [4], "tails": ["renormalize", "bucket"]},
            "records": records, "ratios": runner.ratios(records), "compare": None}


def test_ratios_tables_and_plots_keep_the_tails_apart(capsys):
    records = [_record("eager", "renormalize", 4.0), _record("kdfast", "renormalize", 1.0),
               _record("eager", "bucket", 6.0), _record("kdfast[torch]", "bucket", 3.0)]
    payload = _payload(records)
    got = {(r["tail"], r["topk"], r["method"]): r["forward_backward"] for r in payload["ratios"]}
    assert got == {("renormalize", 4, "kdfast"): 4.0, ("bucket", 4, "kdfast[torch]"): 2.0}
    assert report.missing_ratios(payload) == []
    payload["ratios"].pop()
    assert report.missing_ratios(payload) == ["topk[bucket,k=4] 8x64 float32: no ratio of kdfast[torch] against eager"]
    report.print_table(payload)
    printed = capsys.readouterr().out
    assert "topk[renormalize,k=4]" in printed and "topk[bucket,k=4]" in printed
    assert set(plots.group_by_loss_dtype_n(records)) == {("topk[renormalize,k=4]", "float32", 8),
                                                         ("topk[bucket,k=4]", "float32", 8)}
    assert keys.loss_label({"loss": "kl"}) == "kl"


def test_compare_matches_a_top_k_case_by_its_tail_and_k():
    old = _payload([_record("kdfast", "renormalize", 1.0), _record("kdfast", "bucket", 1.0),
                    _record("kdfast", "bucket", 1.0, k=8)])
    new = _payload([_record("kdfast", "renormalize", 2.0), _record("kdfast", "bucket", 1.0)])
    result = compare(old, new)
    rows = {(r["tail"], r["topk"], r["phase"]): r["verdict"] for r in result["rows"]}
    assert rows[("renormalize", 4, "forward_backward")] == "regression"
    assert rows[("bucket", 4, "forward_backward")] == "same"
    assert result["missing"] == ["topk[bucket,k=8] 8x64 float32 kdfast: absent in new"]


# ----------------------------------------------------------------- the command line, end to end
@needs_cpu_kernels
def test_kdfast_bench_runs_both_tails_and_several_ks_into_one_file_and_compares(tmp_path):
    out = tmp_path / "out"
    assert kdfast_main(["bench", "--losses", "topk", "--shapes", "8x64", "--topk", "4,8", "--tail",
                        "renormalize,bucket", "--backends", "cpu", "torch", "--memory", "off", "--out", str(out),
                        *TINY]) == 0
    (path,) = out.glob("*.json")
    payload = json.loads(path.read_text())
    assert payload["settings"]["topk"] == [4, 8] and payload["settings"]["tails"] == ["renormalize", "bucket"]
    assert {(r["tail"], r["topk"]) for r in payload["records"]} == {(t, k) for t in ("renormalize", "bucket")
                                                                    for k in (4, 8)}
    assert {(r["tail"], r["topk"]) for r in payload["ratios"]} == {(t, k) for t in ("renormalize", "bucket")
                                                                   for k in (4, 8)}
    assert report.missing_ratios(payload) == []

    again = tmp_path / "again"
    assert kdfast_main(["bench", "--compare", str(path), "--out", str(again), "--no-plots", "--no-progress"]) == 0
    (redo,) = again.glob("*.json")
    assert [keys.case_key(r) + (r["method"],) for r in json.loads(redo.read_text())["records"]] == \
        [keys.case_key(r) + (r["method"],) for r in payload["records"]]


def test_the_acceptance_script_defaults_to_the_issues_cases():
    module = runpy.run_path(str(SCRIPT), run_name="not_main")
    parser = module["make_parser"]()
    assert parser.get_default("out") == str(SCRIPT.parent / "results")
    topk_args = module["part_arguments"](parser, "topk", [])
    cases, settings, options = cli.resolve(topk_args)
    assert _names(cases) == [("topk", "4096x128256", dtype, tail, k) for dtype in ("float32", "bfloat16")
                             for tail in ("renormalize", "bucket") for k in (64, 256)]
    assert settings.backends == ("cpu", "torch") and set(settings.baselines) >= {"eager", "compile"}
    assert options["phases"] == ["forward_backward"]
    cases, settings, options = cli.resolve(module["part_arguments"](parser, "fused_linear_topk", []))
    assert _names(cases) == [("fused_linear_topk", "4096x49152", "float32", tail, 64)
                             for tail in ("renormalize", "bucket")]
    assert settings.hidden == 576 and options["memory"] == "auto"
    # the command line wins: dropping torch.compile, a small shape
    cases, settings, _ = cli.resolve(module["part_arguments"](parser, "topk", ["--baselines", "eager", "--shapes",
                                                                               "64x1024"]))
    assert settings.baselines == ("eager",) and {c.shape for c in cases} == {"64x1024"}


@needs_cpu_kernels
def test_the_acceptance_script_writes_one_file_per_run(tmp_path, capsys):
    module = runpy.run_path(str(SCRIPT), run_name="not_main")
    assert module["main"](["--shapes", "8x64", "--topk", "4", "--hidden", "16", "--baselines", "eager",
                           "--memory", "in-process", "--out", str(tmp_path), *TINY]) == 0
    files = sorted(p.name for p in tmp_path.glob("*.json"))
    assert [f.split("-cpu-")[0] for f in files] == ["kdfast-bench-fused_linear_topk", "kdfast-bench-topk"]
    for name in files:
        payload = json.loads((tmp_path / name).read_text())
        assert report.missing_ratios(payload) == []
        assert {r["tail"] for r in payload["records"]} == {"renormalize", "bucket"}
    assert module["main"](["--tail", "drop", "--out", str(tmp_path)]) == 2
    assert "bench_topk.py: error: unknown tail 'drop'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        module["main"](["--help"])
    assert exit_info.value.code == 0 and "--part" in capsys.readouterr().out
