"""The plots and the comparison of ``kdfast bench`` result payloads (schema 1).

The payloads are built by hand, following the schema, so that these tests do
not run a benchmark (and stay fast).
"""

from __future__ import annotations

import builtins
import copy
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kdfast.bench.compare import cases_of, compare, load_payload, print_comparison
from kdfast.bench.plots import write_plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO_ROOT = Path(__file__).resolve().parents[1]
COPY_GBPS = 20.0

SETTINGS = {
    "losses": ["kl", "fused_linear"], "shapes": ["64x1000", "64x4000"], "dtypes": ["float32"],
    "device": "cpu", "baselines": ["eager", "compile"], "backends": ["cpu"], "runs": 7, "warmup": 1,
    "temperature": 2.0, "phases": ["forward", "backward", "forward_backward"], "memory": "off",
    "topk": 64, "hidden": 576, "threads": 2, "compile_backend": "inductor",
}


def phase(median_s: float, spread: float = 0.0) -> dict:
    """A phase dict whose quartiles agree with ``spread`` = (q3 - q1) / median."""
    q1, q3 = median_s * (1 - spread / 2), median_s * (1 + spread / 2)
    return {"times_s": [q1, median_s, q3], "median_s": median_s, "q1_s": q1, "q3_s": q3, "min_s": q1,
            "spread": spread}


def record(loss: str = "kl", n: int = 64, v: int = 1000, method: str = "kdfast", fb_s: float = 1e-3,
           spread: float = 0.0, bytes_moved=None, dtype: str = "float32") -> dict:
    kind = "kdfast" if method.startswith("kdfast") else "baseline"
    fraction = None if bytes_moved is None else bytes_moved / fb_s / (COPY_GBPS * 1e9)
    return {
        "loss": loss, "family": "distill", "shape": f"{n}x{v}", "N": n, "V": v, "dtype": dtype,
        "method": method, "kind": kind,
        "phases": {"forward": phase(fb_s / 3, spread), "backward": phase(2 * fb_s / 3, spread),
                   "forward_backward": phase(fb_s, spread)},
        "peak_extra_bytes": None, "bytes_moved": bytes_moved, "roofline_fraction": fraction,
        "nominal_roofline_fraction": None, "value": 0.5, "value_rel_diff": 0.0,
    }


def failed_record(loss: str = "kl", n: int = 64, v: int = 1000, method: str = "liger", error: str = "no GPU") -> dict:
    return {"loss": loss, "family": "distill", "shape": f"{n}x{v}", "N": n, "V": v, "dtype": "float32",
            "method": method, "kind": "baseline", "error": error}


def make_payload(records: list, cpu: str = "Test CPU", threads: int = 2, gpu=None,
                 created: str = "2026-11-30T02:10:00") -> dict:
    return {
        "benchmark": "kdfast bench", "schema": 1, "created": created,
        "machine": {"device": "cpu", "cpu": cpu, "logical_cpus": 4, "torch_threads": threads, "torch": "2.13.0",
                    "kdfast": "0.1.0", "kdfast_cpu_capability": "avx2", "torch_cpu_capability": "AVX2",
                    "gpu": gpu, "python": "3.11.7", "load_average_1m": 0.1,
                    "copy_bandwidth_GBps": COPY_GBPS, "nominal_bandwidth_GBps": 40.0},
        "settings": copy.deepcopy(SETTINGS),
        "records": records,
        "ratios": [],
        "compare": None,
    }


def two_vocab_payload() -> dict:
    """kl at V = 1000 and 4000, kdfast and eager, with bytes_moved: enough for both plots."""
    records = []
    for v in (1000, 4000):
        moved = 64 * v * 4 * 3
        records.append(record(v=v, method="eager", fb_s=4e-4 * v / 1000, bytes_moved=moved))
        records.append(record(v=v, method="kdfast", fb_s=1e-4 * v / 1000, bytes_moved=moved))
    return make_payload(records)


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE


# ----------------------------------------------------------------- plots


def test_both_plots_are_written_as_png(tmp_path):
    written = write_plots(two_vocab_payload(), tmp_path / "plots", "run1")
    assert written == [tmp_path / "plots" / "run1-time-vs-vocab.png", tmp_path / "plots" / "run1-roofline.png"]
    for path in written:
        assert_png(path)


def test_roofline_is_not_written_without_bytes_moved(tmp_path):
    payload = make_payload([record(loss="fused_linear", method=m, bytes_moved=None) for m in ("eager", "kdfast")])
    written = write_plots(payload, tmp_path, "fl")
    assert written == [tmp_path / "fl-time-vs-vocab.png"]
    assert_png(written[0])
    assert not (tmp_path / "fl-roofline.png").exists()


def test_records_with_error_or_skipped_are_ignored(tmp_path):
    # Failed records carrying timings anyway: were they drawn, both pictures would be written.
    errored = dict(record(method="liger", bytes_moved=1000), error="no GPU")
    skipped = dict(record(method="compile", bytes_moved=1000), skipped="no compiler")
    assert write_plots(make_payload([errored, skipped]), tmp_path, "failed") == []
    assert list(tmp_path.iterdir()) == []
    # Next to records that ran they change nothing either.
    payload = two_vocab_payload()
    payload["records"] += [failed_record(), skipped]
    assert len(write_plots(payload, tmp_path, "mixed")) == 2


def test_single_vocabulary_and_many_groups_are_drawn(tmp_path):
    records = [record(n=n, method=m, bytes_moved=1000) for n in range(1, 15) for m in ("eager", "kdfast")]
    written = write_plots(make_payload(records), tmp_path, "many")
    assert len(written) == 2
    for path in written:
        assert_png(path)


@pytest.mark.parametrize("how", ["sys.modules", "import"])
def test_write_plots_without_matplotlib_returns_empty(tmp_path, monkeypatch, how):
    if how == "sys.modules":
        monkeypatch.setitem(sys.modules, "matplotlib", None)
    else:
        real_import = builtins.__import__

        def import_without_matplotlib(name, *args, **kwargs):
            if name == "matplotlib" or name.startswith("matplotlib."):
                raise ImportError("No module named 'matplotlib'")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", import_without_matplotlib)
    assert write_plots(two_vocab_payload(), tmp_path, "none") == []
    assert list(tmp_path.iterdir()) == []


def test_plots_and_compare_do_not_import_torch_or_matplotlib():
    """Loaded from their folder as a package of its own (kdfast/__init__ and kdfast/bench/__init__ import
    torch), the modules and what they import from beside them (keys.py) import neither."""
    script = (
        "import importlib, sys, types\n"
        "package = types.ModuleType('bench_files')\n"
        f"package.__path__ = [r'{REPO_ROOT}/kdfast/bench']\n"
        "sys.modules['bench_files'] = package\n"
        "for name in ('plots', 'compare'):\n"
        "    importlib.import_module('bench_files.' + name)\n"
        "print(sorted(m for m in ('torch', 'matplotlib', 'kdfast') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------- compare


def timed_pair(new_fb_s: float, old_spread: float = 0.0, new_spread: float = 0.0) -> tuple:
    old = make_payload([record(method="kdfast", fb_s=1e-3, spread=old_spread)])
    new = make_payload([record(method="kdfast", fb_s=new_fb_s, spread=new_spread)])
    return old, new


def fb_row(result: dict) -> dict:
    [row] = [r for r in result["rows"] if r["phase"] == "forward_backward"]
    return row


@pytest.mark.parametrize("factor, verdict", [(2.0, "regression"), (0.5, "improvement"), (1.02, "same")])
def test_verdicts(factor, verdict):
    result = compare(*timed_pair(1e-3 * factor))
    row = fb_row(result)
    assert row["verdict"] == verdict
    assert row["ratio"] == pytest.approx(factor)
    assert row["old_s"] == pytest.approx(1e-3)
    assert row["new_s"] == pytest.approx(1e-3 * factor)
    assert row["tolerance"] == pytest.approx(0.05)
    assert {k: row[k] for k in ("loss", "shape", "dtype", "method")} == {
        "loss": "kl", "shape": "64x1000", "dtype": "float32", "method": "kdfast"}
    # All three phases scale alike, so all three rows agree.
    assert [r["phase"] for r in result["rows"]] == ["forward", "backward", "forward_backward"]
    assert result["regressions"] == (3 if verdict == "regression" else 0)
    assert result["improvements"] == (3 if verdict == "improvement" else 0)
    assert result["missing"] == [] and result["machine_differences"] == {} and result["warning"] is None
    assert result["timing_differences"] == {}


def test_tolerance_grows_with_measured_spread():
    quiet = fb_row(compare(*timed_pair(1.5e-3)))
    noisy = fb_row(compare(*timed_pair(1.5e-3, old_spread=0.3, new_spread=0.3)))
    assert quiet["verdict"] == "regression"
    assert noisy["tolerance"] == pytest.approx(0.6)
    assert noisy["verdict"] == "same"
    # Beyond the noise it is a regression again.
    assert fb_row(compare(*timed_pair(1.7e-3, old_spread=0.3, new_spread=0.3)))["verdict"] == "regression"
    # The floor applies when the runs are quieter than min_tolerance.
    assert fb_row(compare(*timed_pair(1.02e-3), min_tolerance=0.01))["verdict"] == "regression"


def test_missing_and_failed_cases_are_listed():
    old = make_payload([record(method="kdfast"), record(method="eager"), record(v=4000, method="kdfast"),
                        failed_record(method="liger")])
    new = make_payload([record(method="kdfast"), failed_record(method="eager", error="out of memory")])
    del new["records"][0]["phases"]["backward"]
    result = compare(old, new)
    assert result["missing"] == [
        "kl 64x1000 float32 kdfast backward: no median in new",
        "kl 64x1000 float32 eager: failed in new (out of memory)",
        "kl 64x4000 float32 kdfast: absent in new",
    ]
    assert [(r["method"], r["phase"]) for r in result["rows"]] == [("kdfast", "forward"),
                                                                     ("kdfast", "forward_backward")]


def test_machine_differences_give_a_warning():
    old = make_payload([record()], cpu="Old CPU", threads=2)
    new = make_payload([record()], cpu="New CPU", threads=8, created="2026-12-01T00:00:00")
    result = compare(old, new)
    assert result["machine_differences"] == {"cpu": ["Old CPU", "New CPU"], "torch_threads": [2, 8]}
    assert "different machines" in result["warning"] and "not regressions" in result["warning"]
    assert result["against"]["created"] == "2026-11-30T02:10:00"
    assert result["against"]["cpu"] == "Old CPU"
    json.dumps(result)  # stored in the new payload's "compare"


@pytest.mark.parametrize("field, old_value, new_value", [("settle_below_s", None, 1.0), ("warmup", 2, 0),
                                                          ("compile_backend", "inductor", "aot_eager")])
def test_different_timing_rules_give_a_warning(field, old_value, new_value):
    """A payload from before fast methods were settled (no settle_below_s), or with another warm-up or
    compile backend, timed its methods differently: its ratios are flagged, as a machine change's are."""
    old, new = make_payload([record()]), make_payload([record()])
    old["settings"].pop(field, None)
    if old_value is not None:
        old["settings"][field] = old_value
    new["settings"][field] = new_value
    result = compare(old, new)
    assert result["timing_differences"] == {field: [old_value, new_value]}
    assert result["machine_differences"] == {}
    assert result["warning"].startswith("the two results were timed under different rules (")
    assert f"{field} {old_value!r} -> {new_value!r}" in result["warning"]
    both = compare(make_payload([record()], cpu="Old CPU"), new)
    assert "different machines" in both["warning"] and "different rules" in both["warning"]
    json.dumps(result)


def test_print_comparison():
    old = make_payload([record(method="kdfast"), record(method="eager")], cpu="Old CPU")
    new = make_payload([record(method="kdfast", fb_s=2e-3)], cpu="New CPU")
    out = io.StringIO()
    print_comparison(compare(old, new), file=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split()[:5] == ["loss", "shape", "dtype", "method", "phase"]
    fb_line = next(line for line in lines if "forward_backward" in line)
    assert fb_line.split() == ["kl", "64x1000", "float32", "kdfast", "forward_backward", "1.000", "2.000",
                               "2.000x", "5%", "REGRESSION"]
    assert "3 timings compared" in out.getvalue() and "3 regressions, 0 improvements, 0 same" in out.getvalue()
    assert "missing: kl 64x1000 float32 eager: absent in new" in lines
    assert lines[-1].startswith("warning: the two results come from different machines")


def test_compare_rejects_foreign_payloads():
    with pytest.raises(ValueError, match="old payload is not a kdfast bench result"):
        compare({"benchmark": "other"}, make_payload([]))
    with pytest.raises(ValueError, match="schema 2"):
        compare(make_payload([]), dict(make_payload([]), schema=2))


# ----------------------------------------------------------------- load_payload and cases_of


def test_load_payload_round_trip(tmp_path):
    path = tmp_path / "result.json"
    payload = two_vocab_payload()
    path.write_text(json.dumps(payload))
    assert load_payload(path) == payload
    assert load_payload(str(path)) == payload


def test_load_payload_missing_file(tmp_path):
    path = tmp_path / "absent.json"
    with pytest.raises(FileNotFoundError, match="absent.json"):
        load_payload(path)


def test_load_payload_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"benchmark": "kdfast bench", ')
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        load_payload(path)


@pytest.mark.parametrize("content", [{"benchmark": "pytest-benchmark", "schema": 1}, [1, 2, 3],
                                     {"benchmark": "kdfast bench", "schema": 99}])
def test_load_payload_foreign_json(tmp_path, content):
    path = tmp_path / "foreign.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="foreign.json"):
        load_payload(path)


def test_cases_of_returns_the_rerun_settings():
    payload = two_vocab_payload()
    cases = cases_of(payload)
    assert cases == SETTINGS  # memory and threads too: --compare measures the same way
    cases["losses"].append("mse")  # a copy: the payload is unchanged
    assert payload["settings"]["losses"] == ["kl", "fused_linear"]


def test_cases_of_rejects_foreign_payloads():
    with pytest.raises(ValueError, match="not a kdfast bench result"):
        cases_of({"benchmark": "something else", "schema": 1, "settings": {}})
    with pytest.raises(ValueError, match="no 'settings'"):
        cases_of({"benchmark": "kdfast bench", "schema": 1})
