"""The loss benchmark (benchmarks/bench_losses.py) and its plain-PyTorch baselines (benchmarks/plain_pytorch.py).

The script runs end to end and writes its JSON (a tiny case; timings are not
checked); every plain form computes kdfast's loss (float64 values and gradients
against ``distill_loss(..., backend="torch")``), so "vs eager" compares the same
math.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import kdfast
from conftest import FUSED_BACKENDS

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _load_bench():
    return _load("bench_losses")


@pytest.mark.skipif("cpu" not in FUSED_BACKENDS, reason="the C++ extension is not built")
def test_bench_losses_writes_records(tmp_path, capsys):
    bench = _load_bench()
    out = tmp_path / "r.json"
    methods = ("eager", "compile", "kdfast", "reference")
    bench.main(["--shapes", "8x300", "--dtypes", "float32", "--divergences", "kl", "jsd", "--methods", *methods,
                "--runs", "2", "--compile-backend", "aot_eager", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["machine"]["torch_threads"] >= 1 and payload["machine"]["copy_bandwidth_GBps"] > 0
    assert payload["machine"]["kdfast_cpu_capability"] != "unavailable"
    records = payload["records"]
    assert [(r["divergence"], r["method"]) for r in records] == [(d, m) for d in ("kl", "jsd") for m in methods]
    for r in records:
        # the same number of timed runs for every method, recorded
        assert r["runs"] == 2 and len(r["times_s"]) == 2 and r["median_s"] > 0
        assert r["value_rel_diff"] < 1e-5  # every method computes the same loss
    printed = capsys.readouterr().out
    assert "vs eager" in printed and "vs reference" in printed and "medians of 2 runs for every method" in printed
    assert payload["bf16_vs_fp32"] == []  # one dtype: nothing to compare


def test_default_methods_measure_what_users_write_and_keep_the_reference_as_an_extra():
    bench = _load_bench()
    plain = _load("plain_pytorch")
    assert bench.DEFAULT_METHODS == ("eager", "compile", "liger", "kdfast")
    methods = bench.make_methods("jsd", 2.0, torch.device("cpu"), compile_backend="aot_eager")
    assert {"eager", "compile", "reference"} <= set(methods) and "liger" not in methods
    s, t = torch.randn(4, 30, dtype=torch.float64), torch.randn(4, 30, dtype=torch.float64)
    want = plain.plain_loss(s, t, divergence="jsd", temperature=2.0, scale=4.0, beta=0.5)
    for name in ("eager", "compile", "reference"):
        torch.testing.assert_close(methods[name](s, t), want)


def test_loss_options_are_hinton_kd_and_wttm_loss():
    bench = _load_bench()
    s, t = torch.randn(5, 17, dtype=torch.float64), torch.randn(5, 17, dtype=torch.float64)
    kd = kdfast.distill_loss(s, t, backend="torch", **bench.loss_options("kl", 3.0))
    torch.testing.assert_close(kd, kdfast.kd_loss(s, t, temperature=3.0, backend="torch"))
    wttm = kdfast.distill_loss(s, t, backend="torch", **bench.loss_options("wttm", 3.0))
    torch.testing.assert_close(wttm, kdfast.wttm_loss(s, t, temperature=3.0, backend="torch"))


# ----------------------------------------------------------------- plain forms == kdfast's reference
PLAIN_CASES = [dict(divergence=d, temperature=2.0, scale=4.0) for d in kdfast.DIVERGENCES] + [
    dict(divergence="jsd", beta=0.3, temperature=1.5),
    dict(divergence="renyi", alpha=2.0),
    dict(divergence="ab", alpha=0.8, beta=0.3),
    dict(divergence="skew_kl", skew=0.25, student_temperature=0.7),
    dict(divergence="skew_reverse_kl", skew=0.4, temperature=3.0),
    dict(divergence="kl", temperature=2.0, student_temperature=1.0, weighting="wttm"),
    dict(divergence="tvd", temperature=1.5, weighting="entropy"),
]


def _value_and_grad(fn, student):
    s = student.detach().clone().requires_grad_(True)
    loss = fn(s)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad


def _random_case(seed=0, shape=(7, 23)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 3,
            torch.randn(shape, generator=g, dtype=torch.float64) * 3)


@pytest.mark.parametrize("options", PLAIN_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_every_plain_form_is_kdfasts_loss_in_float64(options):
    plain = _load("plain_pytorch")
    s, t = _random_case()
    got = _value_and_grad(lambda x: plain.plain_loss(x, t, **options), s)
    want = _value_and_grad(lambda x: kdfast.distill_loss(x, t, backend="torch", **options), s)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)


def test_every_divergence_has_a_plain_form():
    plain = _load("plain_pytorch")
    assert set(plain.DIVERGENCE_ROWS) == set(kdfast.DIVERGENCES)


def test_plain_forms_accumulate_16_bit_logits_in_float32():
    plain = _load("plain_pytorch")
    s, t = _random_case(seed=1)
    for options in PLAIN_CASES[:8]:
        got = plain.plain_loss(s.bfloat16(), t.bfloat16(), **options)
        want = kdfast.distill_loss(s.bfloat16(), t.bfloat16(), backend="torch", **options)
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dkd_plain_form_is_mdistillers_and_kdfasts_loss():
    plain = _load("plain_pytorch")
    s, t = _random_case(seed=2, shape=(9, 12))
    labels = torch.arange(9) % 12
    got = _value_and_grad(lambda x: plain.dkd_mdistiller(x, t, labels, 3.0, 1.0, 8.0), s)
    want = _value_and_grad(lambda x: kdfast.dkd_loss(x, t, labels, 3.0, 1.0, 8.0, backend="torch"), s)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)


def test_dist_and_correlation_plain_forms_are_the_references():
    plain = _load("plain_pytorch")
    s, t = _random_case(seed=3, shape=(6, 10))
    torch.testing.assert_close(plain.plain_other_loss("dist")(s, t, 2.0, 1.0, 1.0),
                               kdfast.dist_loss(s, t, 2.0, backend="torch"))
    torch.testing.assert_close(plain.plain_other_loss("correlation")(s, t, 2.0, 1.0, 1.0, 1.0, None),
                               kdfast.correlation_loss(s, t, 2.0, backend="torch"))


# ----------------------------------------------------------------- pure helpers
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

    assert bench.liger_method("kl", 2.0, torch.device("cpu")) is None
    assert bench.nominal_bandwidth(torch.device("cpu")) is None


def test_a_failing_method_is_recorded_and_the_others_still_run(monkeypatch):
    bench = _load_bench()
    real = bench.make_methods

    def with_a_broken_eager(*args, **kwargs):
        methods = real(*args, **kwargs)

        def broken(s, t):
            raise torch.OutOfMemoryError("pretend")

        return dict(methods, eager=broken)

    monkeypatch.setattr(bench, "make_methods", with_a_broken_eager)
    records = bench.bench_case("kl", 4, 30, torch.float32, torch.device("cpu"), 1, 2.0, ("eager", "reference"), 1e9)
    assert records[0]["method"] == "eager" and records[0]["error"] == "out of memory"
    assert records[1]["method"] == "reference" and records[1]["runs"] == 1
    stopped = bench.bench_case("kl", 4, 30, torch.float32, torch.device("cpu"), 1, 2.0, ("reference",), 1e9,
                               stop=lambda: "time budget of 1 s spent")
    assert stopped == [dict(divergence="kl", N=4, V=30, dtype="float32", method="reference",
                            skipped="time budget of 1 s spent")]
