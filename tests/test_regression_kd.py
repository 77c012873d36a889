"""Distributional regression KD (kdfast.regression) and its experiment, ``kdfast distill-regression``."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import kdfast
from kdfast import regression as R

torch.set_num_threads(1)


def rand(*shape, seed=0, dtype=torch.float64, scale=1.0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_(requires_grad)


def gauss(n=7, seed=0, requires_grad=True):
    """(mean, logvar) float64 leaves with log-variances well above the floor."""
    return rand(n, seed=seed, requires_grad=requires_grad), rand(n, seed=seed + 100, scale=0.5,
                                                                 requires_grad=requires_grad)


# ---------------------------------------------------------------------------- the formulas
def test_nll_matches_normal_log_prob_and_torch_gaussian_nll():
    mu, s = gauss(9)
    y = rand(9, seed=5)
    direct = -Normal(mu, torch.exp(0.5 * s)).log_prob(y)
    torch.testing.assert_close(kdfast.gaussian_nll_loss(mu, s, y, reduction="none"), direct)
    torch.testing.assert_close(kdfast.gaussian_nll_loss(mu, s, y), direct.mean())
    torch.testing.assert_close(kdfast.gaussian_nll_loss(mu, s, y, reduction="sum"), direct.sum())
    torch.testing.assert_close(kdfast.gaussian_nll_loss(mu, s, y, full=False),
                               torch.nn.functional.gaussian_nll_loss(mu, y, torch.exp(s), full=False))


def test_kl_matches_torch_distributions_in_both_directions():
    (ms, ss), (mt, st) = gauss(8, 1), gauss(8, 2)
    S, T = Normal(ms, torch.exp(0.5 * ss)), Normal(mt, torch.exp(0.5 * st))
    torch.testing.assert_close(kdfast.gaussian_kl(mt, st, ms, ss, reduction="none"), kl_divergence(T, S))
    fwd = kdfast.gaussian_kd_loss(ms, ss, mt, st, reduction="none")
    rev = kdfast.gaussian_kd_loss(ms, ss, mt, st, direction="reverse", reduction="none")
    sym = kdfast.gaussian_kd_loss(ms, ss, mt, st, direction="symmetric", reduction="none")
    torch.testing.assert_close(fwd, kl_divergence(T, S))
    torch.testing.assert_close(rev, kl_divergence(S, T))
    torch.testing.assert_close(sym, 0.5 * (kl_divergence(T, S) + kl_divergence(S, T)))
    torch.testing.assert_close(kdfast.gaussian_kd_loss(ms, ss, mt, st), kl_divergence(T, S).mean())


def test_batch_pearson_matches_corrcoef_per_column():
    a, b = rand(12, 3, seed=1), rand(12, 3, seed=2)
    expected = torch.stack([1 - torch.corrcoef(torch.stack([a[:, d], b[:, d]]))[0, 1] for d in range(3)])
    torch.testing.assert_close(kdfast.batch_pearson_loss(a, b, reduction="none"), expected)
    torch.testing.assert_close(kdfast.batch_pearson_loss(a, b), expected.mean())
    torch.testing.assert_close(kdfast.batch_pearson_loss(a[:, 0], b[:, 0]), expected[0])


def _pairwise_loops(a, b, kind, beta=1.0, tau=1.0):
    """The pairwise losses of one column, written as loops over the pairs."""
    n = len(a)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    ma = sum(abs(a[i] - a[j]) for i, j in pairs) / len(pairs)
    mb = sum(abs(b[i] - b[j]) for i, j in pairs) / len(pairs)
    total, count = 0.0, 0
    for i, j in pairs:
        ds, dt = (a[i] - a[j]) / ma, (b[i] - b[j]) / mb
        if kind == "difference":
            r = abs(ds - dt)
            total += 0.5 * r * r / beta if r < beta else r - 0.5 * beta
            count += 1
        elif b[i] != b[j]:
            sign = 1.0 if b[i] > b[j] else -1.0
            total += math.log1p(math.exp(-sign * ds / tau))
            count += 1
    return total / count


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_pairwise_difference_matches_loops(beta):
    a, b = rand(6, seed=3), rand(6, seed=4)
    expected = _pairwise_loops(a.tolist(), b.tolist(), "difference", beta=beta)
    assert kdfast.pairwise_difference_loss(a, b, beta=beta).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_pairwise_order_matches_loops_and_skips_ties(tau):
    a, b = rand(6, seed=5), rand(6, seed=6)
    b[2] = b[4]  # a tie of the teacher: that pair does not count
    expected = _pairwise_loops(a.tolist(), b.tolist(), "order", tau=tau)
    assert kdfast.pairwise_order_loss(a, b, temperature=tau).item() == pytest.approx(expected, rel=1e-12)


def test_distributional_kd_loss_is_the_weighted_sum():
    (ms, ss), (mt, st) = gauss(10, 1), gauss(10, 2)
    y = rand(10, seed=3)
    total, terms = kdfast.distributional_kd_loss(ms, ss, mt, st, y, nll_weight=0.5, kl_weight=2.0,
                                                 direction="reverse", pearson_weight=5, difference_weight=3,
                                                 order_weight=0.25, return_terms=True)
    expected = (0.5 * kdfast.gaussian_nll_loss(ms, ss, y) + 2 * kdfast.gaussian_kd_loss(ms, ss, mt, st, direction="reverse")
                + 5 * kdfast.batch_pearson_loss(ms, mt) + 3 * kdfast.pairwise_difference_loss(ms, mt)
                + 0.25 * kdfast.pairwise_order_loss(ms, mt))
    torch.testing.assert_close(total, expected)
    assert set(terms) == {"nll", "kl", "pearson", "difference", "order"}
    assert all(not t.requires_grad for t in terms.values())
    # weight 0 leaves a term out; no target is fine for an unlabelled transfer set
    _, terms = kdfast.distributional_kd_loss(ms, ss, mt, st, nll_weight=0, return_terms=True)
    assert set(terms) == {"kl"}


# ---------------------------------------------------------------------------- gradients (float64)
def test_gradcheck_nll_and_kl():
    mu, s = gauss(5, 1)
    y = rand(5, seed=2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: kdfast.gaussian_nll_loss(a, b, c), (mu, s, y))
    assert torch.autograd.gradcheck(lambda a, b, c: kdfast.gaussian_nll_loss(a, b, c, reduction="none"), (mu, s, y))
    (mp, sp), (mq, sq) = gauss(5, 3), gauss(5, 4)
    assert torch.autograd.gradcheck(lambda *x: kdfast.gaussian_kl(*x, reduction="sum"), (mp, sp, mq, sq))


@pytest.mark.parametrize("direction", ["forward", "reverse", "symmetric"])
def test_gradcheck_kd_loss(direction):
    (ms, ss), (mt, st) = gauss(5, 1), gauss(5, 2, requires_grad=False)
    assert torch.autograd.gradcheck(lambda a, b: kdfast.gaussian_kd_loss(a, b, mt, st, direction=direction), (ms, ss))


@pytest.mark.parametrize("fn", [kdfast.batch_pearson_loss, kdfast.pairwise_difference_loss, kdfast.pairwise_order_loss])
@pytest.mark.parametrize("shape", [(6,), (6, 2)])
def test_gradcheck_correlational_losses(fn, shape):
    a, b = rand(*shape, seed=1, requires_grad=True), rand(*shape, seed=2)
    assert torch.autograd.gradcheck(lambda x: fn(x, b, reduction="sum"), (a,))


def test_gradcheck_combined_objective():
    (ms, ss), (mt, st) = gauss(6, 1), gauss(6, 2, requires_grad=False)
    y = rand(6, seed=3)
    assert torch.autograd.gradcheck(
        lambda a, b: kdfast.distributional_kd_loss(a, b, mt, st, y, pearson_weight=5, difference_weight=5,
                                                   order_weight=1), (ms, ss))


def test_only_the_student_gets_gradients_from_the_distillation_losses():
    (ms, ss), (mt, st) = gauss(6, 1), gauss(6, 2)
    y = rand(6, seed=3)
    loss = kdfast.distributional_kd_loss(ms, ss, mt, st, y, pearson_weight=1, difference_weight=1, order_weight=1)
    loss.backward()
    assert mt.grad is None and st.grad is None
    assert ms.grad is not None and ss.grad is not None


# ---------------------------------------------------------------------------- properties
def test_kl_is_non_negative_and_zero_iff_equal():
    for seed in range(20):
        (mp, sp), (mq, sq) = gauss(50, seed, False), gauss(50, seed + 50, False)
        assert (kdfast.gaussian_kl(mp, sp, mq, sq, reduction="none") >= 0).all()
        assert kdfast.gaussian_kl(mp, sp, mp, sp, reduction="none").abs().max() < 1e-12
    mu, s = gauss(4, 0, False)
    assert (kdfast.gaussian_kl(mu, s, mu + 1e-3, s, reduction="none") > 0).all()
    assert (kdfast.gaussian_kl(mu, s, mu, s + 1e-3, reduction="none") > 0).all()
    for direction in R.KL_DIRECTIONS:
        assert kdfast.gaussian_kd_loss(mu, s, mu, s, direction=direction).abs() < 1e-12


def test_kl_of_equal_variances_is_half_the_squared_standardised_gap():
    mu, s = gauss(5, 0, False)
    torch.testing.assert_close(kdfast.gaussian_kl(mu, s, mu + 0.3, s, reduction="none"), 0.5 * 0.09 * torch.exp(-s))


def test_correlational_losses_are_invariant_to_shifting_and_scaling_the_means():
    a, b = rand(10, seed=1), rand(10, seed=2)
    for fn in (kdfast.batch_pearson_loss, kdfast.pairwise_difference_loss, kdfast.pairwise_order_loss):
        base = fn(a, b)
        torch.testing.assert_close(fn(3.0 * a - 7.0, b), base)
        torch.testing.assert_close(fn(0.01 * a + 100.0, b), base)
    for fn in (kdfast.batch_pearson_loss, kdfast.pairwise_difference_loss):
        torch.testing.assert_close(fn(a, 4.0 * b + 2.0), fn(a, b))
    # the order loss sees only the teacher's order: any increasing map of the teacher leaves it unchanged
    torch.testing.assert_close(kdfast.pairwise_order_loss(a, torch.exp(3 * b)), kdfast.pairwise_order_loss(a, b))


def test_correlational_losses_are_zero_at_a_positive_affine_copy_of_the_teacher():
    b = rand(10, seed=2)
    assert kdfast.batch_pearson_loss(2 * b + 1, b).abs() < 1e-12
    assert kdfast.pairwise_difference_loss(2 * b + 1, b).abs() < 1e-12
    torch.testing.assert_close(kdfast.batch_pearson_loss(-b, b), torch.tensor(2.0, dtype=torch.float64))
    assert kdfast.pairwise_difference_loss(-b, b) > 0.5
    # the order loss is smallest for the teacher's order: reversing it costs more
    assert kdfast.pairwise_order_loss(b, b) < kdfast.pairwise_order_loss(-b, b)


def test_constant_teacher_column_is_defined():
    a = rand(5, seed=1, requires_grad=True)
    c = torch.full((5,), 3.0, dtype=torch.float64)
    assert kdfast.batch_pearson_loss(a, c).item() == pytest.approx(1.0)
    assert kdfast.pairwise_order_loss(a, c).item() == 0.0  # no ordered pair
    loss = kdfast.pairwise_difference_loss(a, c)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all()


def test_variance_floor():
    mu, y = torch.zeros(3, dtype=torch.float64), torch.full((3,), 2.0, dtype=torch.float64)
    s = torch.tensor([-40.0, -30.0, 0.0], dtype=torch.float64, requires_grad=True)
    floor = math.log(R.VAR_FLOOR)
    nll = kdfast.gaussian_nll_loss(mu, s, y, reduction="none")
    at_floor = kdfast.gaussian_nll_loss(mu, torch.full((3,), floor, dtype=torch.float64), y, reduction="none")
    torch.testing.assert_close(nll[:2], at_floor[:2])
    nll.sum().backward()
    assert s.grad[:2].abs().max() == 0 and s.grad[2] != 0
    big = kdfast.gaussian_nll_loss(mu, s.detach(), y, reduction="none", var_floor=1.0)
    torch.testing.assert_close(big, 0.5 * (math.log(2 * math.pi) + torch.full((3,), 4.0, dtype=torch.float64)))
    assert torch.isfinite(kdfast.gaussian_kl(mu, s, mu, s.detach() - 100)).all()


@pytest.mark.parametrize("dtype,out", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                       (torch.bfloat16, torch.float32), (torch.float64, torch.float64)])
def test_dtypes(dtype, out):
    a, b, y = (rand(8, seed=k).to(dtype) for k in range(3))
    for value in (kdfast.gaussian_nll_loss(a, b, y), kdfast.gaussian_kd_loss(a, b, y, a),
                  kdfast.batch_pearson_loss(a, y), kdfast.pairwise_difference_loss(a, y),
                  kdfast.pairwise_order_loss(a, y)):
        assert value.dtype == out and torch.isfinite(value)


# ---------------------------------------------------------------------------- errors
def test_bad_inputs_are_clear_errors():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match=r"logvar shape \(5,\) does not match mean shape \(4,\)"):
        kdfast.gaussian_nll_loss(x, torch.zeros(5), x)
    with pytest.raises(TypeError, match="floating tensor"):
        kdfast.gaussian_nll_loss(x, x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        kdfast.gaussian_kd_loss(x, x, [0.0] * 4, x)
    with pytest.raises(ValueError, match="teacher_logvar has non-finite"):
        kdfast.gaussian_kd_loss(x, x, x, torch.tensor([0.0, float("nan"), 0.0, 0.0]))
    with pytest.raises(ValueError, match="target has non-finite"):
        kdfast.gaussian_nll_loss(x, x, torch.tensor([0.0, float("inf"), 0.0, 0.0]))
    with pytest.raises(ValueError, match="empty"):
        kdfast.gaussian_kl(*(torch.zeros(0),) * 4)
    with pytest.raises(ValueError, match="reduction must be one of"):
        kdfast.gaussian_nll_loss(x, x, x, reduction="batchmean")
    with pytest.raises(ValueError, match="var_floor must be > 0"):
        kdfast.gaussian_nll_loss(x, x, x, var_floor=0.0)
    with pytest.raises(ValueError, match="var_floor must be finite"):
        kdfast.gaussian_kl(x, x, x, x, var_floor=float("nan"))
    with pytest.raises(TypeError, match="var_floor must be a real number"):
        kdfast.gaussian_kl(x, x, x, x, var_floor=True)
    with pytest.raises(ValueError, match="direction must be one of"):
        kdfast.gaussian_kd_loss(x, x, x, x, direction="backward")
    with pytest.raises(ValueError, match="at least 2 rows"):
        kdfast.batch_pearson_loss(torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match=r"shape \(N,\) or \(N, D\)"):
        kdfast.pairwise_difference_loss(torch.zeros(2, 2, 2), torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kdfast.pairwise_order_loss(x, x, temperature=0)
    with pytest.raises(ValueError, match="target is None but nll_weight"):
        kdfast.distributional_kd_loss(x, x, x, x)
    with pytest.raises(ValueError, match="is on meta but"):
        kdfast.gaussian_kl(x, x, x, torch.zeros(4, device="meta"))


# ---------------------------------------------------------------------------- modules and metrics
def test_modules_match_functions_and_check_options_when_built():
    (ms, ss), (mt, st) = gauss(6, 1, False), gauss(6, 2, False)
    y = rand(6, seed=3)
    torch.testing.assert_close(kdfast.GaussianKDLoss(direction="reverse")(ms, ss, mt, st),
                               kdfast.gaussian_kd_loss(ms, ss, mt, st, direction="reverse"))
    torch.testing.assert_close(kdfast.BatchPearsonLoss()(ms, mt), kdfast.batch_pearson_loss(ms, mt))
    torch.testing.assert_close(kdfast.PairwiseDifferenceLoss(beta=0.5)(ms, mt),
                               kdfast.pairwise_difference_loss(ms, mt, beta=0.5))
    torch.testing.assert_close(kdfast.PairwiseOrderLoss(temperature=2.0)(ms, mt),
                               kdfast.pairwise_order_loss(ms, mt, temperature=2.0))
    module = kdfast.DistributionalKDLoss(pearson_weight=5, difference_weight=5)
    torch.testing.assert_close(module(ms, ss, mt, st, y),
                               kdfast.distributional_kd_loss(ms, ss, mt, st, y, pearson_weight=5, difference_weight=5))
    assert "pearson_weight=5" in repr(module)
    with pytest.raises(ValueError, match="direction"):
        kdfast.GaussianKDLoss(direction="sideways")
    with pytest.raises(ValueError, match="beta must be > 0"):
        kdfast.PairwiseDifferenceLoss(beta=-1)
    with pytest.raises(ValueError, match="must be finite"):
        kdfast.DistributionalKDLoss(kl_weight=float("inf"))


def test_gaussian_head():
    head = kdfast.GaussianHead(5, 2, init_logvar=-1.0)
    mean, logvar = head(torch.randn(3, 5))
    assert mean.shape == logvar.shape == (3, 2)
    torch.testing.assert_close(logvar, torch.full((3, 2), -1.0))  # starts from one common variance
    mean, logvar = kdfast.GaussianHead(5, squeeze=True)(torch.randn(4, 5))
    assert mean.shape == logvar.shape == (4,)


def test_calibration_of_true_and_overconfident_forecasts():
    n = 20000
    mu, s = rand(n, seed=1), rand(n, seed=2, scale=0.3)
    y = mu + torch.exp(0.5 * s) * rand(n, seed=3)
    good = R.gaussian_calibration(mu, s, y)
    for p in (50, 90, 95):
        assert good[f"coverage_{p}"] == pytest.approx(p / 100, abs=0.015)
    assert good["calibration_error"] < 0.01
    over = R.gaussian_calibration(mu, s - 2.0, y)  # variances too small by e^2
    assert over["coverage_90"] < 0.6 and over["calibration_error"] > 0.1


# ---------------------------------------------------------------------------- the experiment
def _has_statsmodels() -> bool:
    from kdfast.experiments import regression_kd as rk

    try:
        rk.co2_path()
    except (ImportError, FileNotFoundError):
        return False
    return True


needs_statsmodels = pytest.mark.skipif(
    not _has_statsmodels(),
    reason="statsmodels is not installed (kdfast distill-regression reads its bundled CO2 series): "
           "pip install --no-deps statsmodels==0.15.0 patsy")


@needs_statsmodels
def test_windows_are_split_in_time_order_without_overlap():
    from kdfast.experiments import regression_kd as rk

    dates, values = rk.load_co2()
    assert len(values) == 2284 and torch.isnan(values).sum() == 59
    d = rk.make_windows(values, dates, 13, 4, 0.6, 0.2)
    assert d.x["train"].shape[1] == 12 and not any(torch.isnan(v).any() for v in d.x.values())
    assert d.dates["train"][1] < d.dates["validation"][0] <= d.dates["validation"][1] < d.dates["test"][0]
    n = {k: len(v) for k, v in d.y.items()}
    assert n["train"] > 1000 and n["validation"] > 400 and n["test"] > 400
    assert abs(float(d.y["train"].mean())) < 1e-5 and float(d.y["train"].std()) == pytest.approx(1.0, abs=1e-5)


def test_default_teacher_is_at_least_five_times_the_student():
    from kdfast.experiments import regression_kd as rk

    c = rk.RegressionKDConfig()
    for window in c.windows:
        teacher = rk.parameter_count(rk.GaussianMLP(window - 1, c.teacher_hidden, c.teacher_dropout))
        student = rk.parameter_count(rk.GaussianMLP(window - 1, c.student_hidden))
        assert teacher >= 5 * student, (window, teacher, student)


def _cli(argv):
    """``kdfast distill-regression ARGV`` through the subcommand's own parser and ``run`` (the errors raised, as
    ``kdfast.cli.main`` turns them into messages), independent of the other subcommands."""
    from kdfast.experiments import regression_kd as rk

    parser = argparse.ArgumentParser(prog="kdfast")
    rk.add_parser(parser.add_subparsers(dest="command"))
    return rk.run(parser.parse_args(["distill-regression", *argv]), [])


def test_the_subcommand_is_registered():
    import kdfast.cli
    from kdfast.experiments import regression_kd

    assert kdfast.cli.COMMANDS["distill-regression"] is regression_kd


@needs_statsmodels
def test_quick_run_from_the_command_line(tmp_path, capsys):
    from kdfast.experiments import regression_kd as rk

    out = tmp_path / "rkd"
    started = time.perf_counter()
    assert _cli(["--quick", "--out", str(out), "--threads", "1"]) == 0
    assert time.perf_counter() - started < 60
    result = json.loads((tmp_path / "rkd.json").read_text())
    assert (tmp_path / "rkd.png").stat().st_size > 0
    assert result["config"]["seeds"] == [0, 1] and result["config"]["windows"] == [13, 52]
    assert len(result["runs"]) == 2 * 2 * (1 + len(rk.METHODS))
    for window in ("13", "52"):
        assert set(result["summary"][window]) == {"teacher", *rk.METHODS}
        assert set(result["paired"][window]["dist-corr-kd"]) >= {"vs mse", "vs kd-mean", "vs nll"}
        for stats in result["summary"][window].values():
            assert set(stats) == set(rk.METRICS)
    assert {c["verdict"] for c in result["claims"]} <= {"holds", "reversed", "not resolved"}
    printed = capsys.readouterr().out
    assert "| dist-corr-kd |" in printed and "window  52:" in printed
    # an existing output is kept unless --force
    with pytest.raises(FileExistsError, match="--force"):
        _cli(["--quick", "--out", str(out)])


def test_missing_statsmodels_is_a_clear_error(monkeypatch, tmp_path, capsys):
    from kdfast.cli import USER_ERRORS

    find_spec = importlib.util.find_spec

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "statsmodels" else find_spec(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps statsmodels") as err:
        _cli(["--quick", "--out", str(tmp_path / "x")])
    assert isinstance(err.value, USER_ERRORS)  # kdfast.cli prints it as a one-line error, exit status 2
    assert not (tmp_path / "x.json").exists()
