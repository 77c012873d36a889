"""The Distiller loop: gradient accumulation, mixed precision, records and metrics lines, progress, errors."""

import json
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdfast.train import ClassificationMetrics, Distiller, make_train_loader, seed_everything
from kdfast.train.progress import _NoBar, progress_bar


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(hidden=16, seed=0):
    seed_everything(seed)
    return nn.Sequential(nn.Linear(6, hidden), nn.ReLU(), nn.Linear(hidden, 4))


def toy_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    y[torch.randperm(n, generator=g)[: n // 3]] = -100  # uneven numbers of labelled rows per micro-batch
    return TensorDataset(x, y)


@pytest.mark.parametrize("loss", ["kd", {"name": "distill", "divergence": "jsd", "temperature": 2.0}, "dkd"])
def test_gradient_accumulation_gives_the_gradient_of_one_large_batch(loss):
    data, teacher = toy_data(), mlp(32, seed=1)

    def train(batch_size, accumulate):
        student = mlp(seed=2)
        d = Distiller(student, teacher, loss, optimizer=torch.optim.SGD(student.parameters(), lr=0.5),
                      grad_accum_steps=accumulate)
        d.fit(make_train_loader(data, batch_size, seed=3), 2, progress=False)
        return student, d.step

    small, steps_small = train(8, 4)
    large, steps_large = train(32, 1)
    assert steps_small == steps_large == 4
    for a, b in zip(small.parameters(), large.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_accumulation_uses_the_count_of_the_whole_window_not_a_mean_of_means():
    # Two micro-batches with 1 and 3 labelled rows: the hard term is (sum of 4 CEs) / 4.
    student = mlp()
    d = Distiller(student, None, optimizer=torch.optim.SGD(student.parameters(), lr=0.1), grad_accum_steps=2)
    x = torch.randn(8, 6)
    y = torch.tensor([0, -100, -100, -100, 1, 2, 3, -100])
    values = d._optimizer_step([(x[:4], y[:4]), (x[4:], y[4:])], epoch=0)
    expected = nn.functional.cross_entropy(mlp()(x), y, ignore_index=-100)
    assert float(values[0]) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_autocasts_the_forward(amp, dtype):
    student, teacher = mlp(), mlp(seed=1)
    seen = []
    student.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    d = Distiller(student, teacher, "kd", optimizer=torch.optim.SGD(student.parameters(), lr=0.1), amp=amp)
    before = [p.detach().clone() for p in student.parameters()]
    record = d.fit(make_train_loader(toy_data(), 16, seed=0), 1, progress=False)[0]
    assert set(seen) == {dtype}
    assert d.scaler.is_enabled() == (amp == "fp16")
    assert all(torch.isfinite(torch.tensor(v)) for v in record["losses"].values())
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(student.parameters(), before))


def test_fit_records_and_metrics_lines(tmp_path):
    data = toy_data()
    student, teacher = mlp(), mlp(seed=1)
    d = Distiller(student, teacher, "kd", optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
                  scheduler=None)
    loader = make_train_loader(data, 16, seed=0)
    history = d.fit(loader, 2, eval_loader=DataLoader(data, batch_size=32), metrics_path=tmp_path / "m.jsonl",
                    progress=False)
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(history))
    assert [r["epoch"] for r in lines] == [1, 2] and [r["step"] for r in lines] == [4, 8]
    assert set(lines[0]) == {"epoch", "step", "lr", "losses", "accuracy", "nll", "ece", "agreement", "time_s"}
    assert set(lines[0]["losses"]) == {"total", "hard", "soft"}
    total = lines[0]["losses"]
    assert total["total"] == pytest.approx(total["hard"] + total["soft"])
    # A fresh run with the same metrics file starts it over.
    d.fit(loader, 1, metrics_path=tmp_path / "m.jsonl", progress=False)
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 1


def test_evaluate_restores_the_training_mode_and_writes_the_diagram(tmp_path):
    pytest.importorskip("matplotlib", reason="the reliability diagram needs matplotlib")
    student = mlp()
    d = Distiller(student, None, optimizer=torch.optim.SGD(student.parameters(), lr=0.1))
    student.train()
    result = d.evaluate(DataLoader(toy_data(), batch_size=16), reliability_path=tmp_path / "r.png")
    assert student.training and (tmp_path / "r.png").exists()
    assert set(result) == {"accuracy", "nll", "ece"}  # no teacher: no agreement


def test_accumulate_metrics_evaluates_models_without_a_distiller():
    from kdfast.train import accumulate_metrics

    student, teacher = mlp(), mlp(seed=1)
    data = toy_data()
    student.train()
    teacher.eval()
    meters = accumulate_metrics([student, teacher], DataLoader(data, batch_size=16), reference=teacher)
    assert student.training and not teacher.training  # modes restored
    x, y = data.tensors
    with torch.no_grad():
        expected = ClassificationMetrics()
        expected.update(student.eval()(x), y, teacher(x))
    assert meters[0].compute() == pytest.approx(expected.compute())
    assert meters[1].compute()["agreement"] == 1.0  # the teacher agrees with itself


def test_step_scheduler_and_epoch_scheduler():
    for interval, expected in (("step", 0.5 ** 4), ("epoch", 0.5)):
        student = mlp()
        opt = torch.optim.SGD(student.parameters(), lr=1.0)
        d = Distiller(student, None, optimizer=opt, scheduler=torch.optim.lr_scheduler.StepLR(opt, 1, 0.5),
                      scheduler_interval=interval)
        d.fit(make_train_loader(toy_data(), 16, seed=0), 1, progress=False)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected)


def test_progress_bar_falls_back_silently_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert isinstance(progress_bar(True, 10, "epoch 1"), _NoBar)
    monkeypatch.undo()
    assert isinstance(progress_bar(False, 10, "epoch 1"), _NoBar)
    tqdm = pytest.importorskip("tqdm", reason="the progress bar itself needs tqdm")
    bar = progress_bar(True, 10, "epoch 1")
    assert isinstance(bar, tqdm.tqdm)
    bar.close()


def test_bad_arguments_raise_clear_errors():
    student = mlp()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="amp"):
        Distiller(student, None, optimizer=opt, amp="fp8")
    with pytest.raises(ValueError, match="grad_accum_steps"):
        Distiller(student, None, optimizer=opt, grad_accum_steps=0)
    with pytest.raises(TypeError, match="optimizer"):
        Distiller(student, None, optimizer="sgd")
    with pytest.raises(ValueError, match="none of student 0"):
        Distiller(student, None, optimizer=torch.optim.SGD(mlp().parameters(), lr=0.1))
    with pytest.raises(ValueError, match="hard_loss"):
        Distiller(student, None, optimizer=opt, hard_loss="hinge")
    with pytest.raises(ValueError, match="hard_weight"):
        Distiller(student, None, optimizer=opt, hard_weight=-1.0)
    with pytest.raises(TypeError, match="teacher"):
        Distiller(student, "resnet", optimizer=opt)
    with pytest.raises(ValueError, match="scheduler_interval"):
        Distiller(student, None, optimizer=opt, scheduler_interval="batch")
    d = Distiller(student, None, optimizer=opt)
    with pytest.raises(TypeError, match=r"\(inputs, labels\) pair"):
        d.fit([torch.randn(4, 6)], 1, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        d.fit([], -1)
