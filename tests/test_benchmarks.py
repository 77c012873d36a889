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


def test_liger_is_only_offered_on_cuda():
    bench = _load_bench()
    import torch

    assert bench.liger_method("kl", 2.0, torch.device("cpu")) is None
    assert bench.nominal_bandwidth(torch.device("cpu")) is None
