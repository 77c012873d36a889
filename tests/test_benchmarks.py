"""The benchmark script runs end to end and writes its JSON (a tiny case; timings are not checked)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from conftest import FUSED_BACKENDS

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_losses.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_losses", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_losses"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif("cpu" not in FUSED_BACKENDS, reason="the C++ extension is not built")
def test_bench_losses_writes_records(tmp_path, capsys):
    bench = _load_bench()
    out = tmp_path / "r.json"
    bench.main(["--shapes", "8x300", "--dtypes", "float32", "--divergences", "kl", "jsd", "--methods", "eager",
                "kdfast", "--runs", "2", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["machine"]["torch_threads"] >= 1 and payload["machine"]["copy_bandwidth_GBps"] > 0
    records = payload["records"]
    assert {(r["divergence"], r["method"]) for r in records} == {(d, m) for d in ("kl", "jsd")
                                                                 for m in ("eager", "kdfast")}
    for r in records:
        assert r["median_s"] > 0 and len(r["times_s"]) >= 2
        assert r["value_rel_diff"] < 1e-5  # every method computes the same loss
    assert "vs eager" in capsys.readouterr().out
    assert payload["bf16_vs_fp32"] == []  # one dtype: nothing to compare


def test_bf16_speedup_compares_the_kernel_times_of_one_case():
    bench = _load_bench()

    def rec(dtype, method, seconds, div="kl"):
        return {"divergence": div, "N": 4, "V": 8, "dtype": dtype, "method": method, "median_s": seconds}

    records = [rec("float32", "kdfast", 0.3), rec("bfloat16", "kdfast", 0.25),
               rec("float32", "eager", 9.0), rec("bfloat16", "eager", 1.0),
               rec("float32", "kdfast", 0.4, div="jsd")]  # no bf16 run of jsd
    (kl,) = bench.dtype_speedups(records)
    assert kl["divergence"] == "kl" and kl["bf16_speedup_over_fp32"] == pytest.approx(1.2)
    assert not kl["target_met"] and kl["target"] == 1.5
    records[1]["median_s"] = 0.15
    assert bench.dtype_speedups(records)[0]["target_met"]


def test_liger_is_only_offered_on_cuda():
    bench = _load_bench()
    import torch

    assert bench.liger_method("kl", 2.0, torch.device("cpu")) is None
    assert bench.nominal_bandwidth(torch.device("cpu")) is None
