"""Label Revision and Data Selection (kdfast.label_revision; Lan et al., 2024).

The oracle of the revision is the paper's formula written out here
(``p' = beta p + (1 - beta) y``, ``beta = eta / (1 + p_max - p_label)`` on the
rows the teacher gets wrong), then each divergence of the reference on it.
Every fused kernel (the C++ row kernel at each SIMD level this CPU has, and
the Triton one, interpreted on CPU tensors without a GPU) is compared with the
reference: float64 to 1e-10, float32 and bfloat16 inputs against the float64
reference of the same values (conftest's tolerances).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import kdfast
from conftest import FUSED_BACKENDS, GRAD_TOL, KERNELS, TRITON_ON_GPU, kernel_backend, kernel_device
from kdfast.config import LOSS_OPTIONS
from kdfast.label_revision import (revised_teacher_probs, select_for_distillation, selection_scores,
                                   teacher_is_wrong)
from kdfast.reference import FORMULAS, divergence as ref_divergence
from kdfast.registry import DIVERGENCE_NAMES

DEVICE = torch.device("cuda" if TRITON_ON_GPU else "cpu")
triton_only = pytest.mark.skipif("triton" not in FUSED_BACKENDS, reason="triton cannot run here")
# A parameter for each divergence that takes one (the others take none).
PARAMS = {"jsd": dict(beta=0.3), "renyi": dict(alpha=0.7), "ab": dict(alpha=0.5, beta=0.8),
          "skew_kl": dict(skew=0.2), "skew_reverse_kl": dict(skew=0.2)}


def rand(*shape, seed=0, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def batch(N=8, V=11, seed=0, dtype=torch.float64):
    """Student, teacher and labels with: a right row, wrong rows, an ignored row, a label the teacher masks,
    a row with masked classes, a tie at the top (right)."""
    s, t = rand(N, V, seed=seed, dtype=dtype), rand(N, V, seed=seed + 1, dtype=dtype)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(seed + 2))
    labels[0] = int(t[0].argmax())                 # right
    labels[1] = -100                               # ignored
    t[2, labels[2]] = -math.inf                    # the teacher masks the label: wrong, p_label = 0
    t[3, 5:] = -math.inf                           # masked classes
    s[3, 5:] = -math.inf                           # (the student masks them too: reverse divergences stay finite)
    labels[3] = 1 if int(t[3, :5].argmax()) != 1 else 2
    top = int(t[4].argmax())
    labels[4] = (top + 1) % V
    t[4, labels[4]] = t[4, top]                     # tie at the top: right
    labels[5] = int(t[5].argmin())                 # wrong
    return s, t, labels


def explicit_revision(t, labels, eta, tau, ignore_index=-100):
    """The paper's formula in float64, row by row."""
    out = torch.softmax(t.double() / tau, -1)
    for i in range(t.shape[0]):
        y = int(labels[i])
        if y == ignore_index or not bool(t[i, y] < t[i].max()):
            continue
        p = out[i].clone()
        beta = eta / (1.0 + float(p.max()) - float(p[y]))
        onehot = torch.zeros_like(p)
        onehot[y] = 1.0
        out[i] = beta * p + (1.0 - beta) * onehot
    return out


# ----------------------------------------------------------------- the reference
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_the_revised_distribution_is_the_papers_formula(tau):
    s, t, labels = batch()
    got = revised_teacher_probs(t, labels, 0.9, temperature=tau)
    want = explicit_revision(t, labels, 0.9, tau)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    wrong = teacher_is_wrong(t, labels)
    assert not wrong[0] and not wrong[1] and wrong[2] and not wrong[4] and wrong[5]
    for i in wrong.nonzero().reshape(-1).tolist():
        y = int(labels[i])
        assert int(got[i].argmax()) == y and (got[i][y] > got[i][torch.arange(11) != y]).all()
    # right rows are untouched, bit for bit; all rows sum to 1; masked classes stay 0
    p = torch.log_softmax(t / tau, -1).exp()
    assert torch.equal(got[~wrong], p[~wrong])
    torch.testing.assert_close(got.sum(-1), torch.ones(8, dtype=torch.float64))
    assert (got[3, 5:] == 0).all() and got[2, labels[2]] > 0


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_every_divergence_on_the_revised_teacher(name):
    s, t, labels = batch(seed=3)
    tau = 2.0
    kw = PARAMS.get(name, {})
    got = kdfast.distill_loss(s, t, divergence=name, temperature=tau, labels=labels, label_revision=0.8,
                              reduction="none", backend="torch", **kw)
    p = explicit_revision(t, labels, 0.8, tau)
    valid = labels != -100
    want = ref_divergence(name, p.log(), torch.log_softmax(s / tau, -1), **kw)
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-10, atol=1e-12)
    assert got[1] == 0


def test_kd_ttm_and_wttm_take_the_option():
    s, t, labels = batch(seed=5)
    p = explicit_revision(t, labels, 0.9, 4.0)
    valid = labels != -100
    kl = FORMULAS["kl"](p.log(), torch.log_softmax(s / 4.0, -1))
    got = kdfast.kd_loss(s, t, 4.0, labels=labels, label_revision=0.9, backend="torch", reduction="none")
    torch.testing.assert_close(got[valid], 16.0 * kl[valid])
    ttm = FORMULAS["kl"](p.log(), torch.log_softmax(s, -1))
    got = kdfast.ttm_loss(s, t, 4.0, labels=labels, label_revision=0.9, reduction="none")
    torch.testing.assert_close(got[valid], ttm[valid])
    # wttm's weight is of the unrevised teacher
    w = kdfast.reference.wttm_weight(t, 4.0)
    got = kdfast.wttm_loss(s, t, 4.0, labels=labels, label_revision=0.9, reduction="none")
    torch.testing.assert_close(got[valid], (w * ttm)[valid])
    # with the hard term and a batchmean
    got = kdfast.kd_loss(s, t, 4.0, labels=labels, label_revision=0.9, hard_weight=0.5)
    ce = torch.nn.functional.cross_entropy(s, labels, reduction="none", ignore_index=-100)
    torch.testing.assert_close(got, (16.0 * kl + 0.5 * ce)[valid].mean())


def test_eta_close_to_one_keeps_the_label_on_top():
    s, t, labels = batch(seed=7)
    p = revised_teacher_probs(t, labels, 1 - 1e-9, temperature=1.0)
    for i in teacher_is_wrong(t, labels).nonzero().reshape(-1).tolist():
        y = int(labels[i])
        others = torch.cat([p[i, :y], p[i, y + 1:]])
        assert p[i, y] > others.max()


@pytest.mark.parametrize("name", ["kl", "jsd", "tvd", "renyi", "reverse_kl"])
def test_gradcheck_float64(name):
    s, t, labels = batch(N=6, V=7, seed=11)
    s = s.clone().requires_grad_(True)
    kw = PARAMS.get(name, {})

    def fn(x):
        return kdfast.distill_loss(x, t, divergence=name, temperature=2.0, labels=labels, label_revision=0.7,
                                   hard_weight=0.3, backend="torch", **kw)

    assert torch.autograd.gradcheck(fn, (s,))
    assert torch.autograd.gradgradcheck(fn, (s,))


def test_a_nan_teacher_row_is_nan_and_leaves_the_others_alone():
    s, t, labels = batch(seed=13)
    t[6, 0] = math.nan
    s = s.clone().requires_grad_(True)
    loss = kdfast.kd_loss(s, t, 2.0, labels=labels, label_revision=0.9, reduction="none", backend="torch")
    assert torch.isnan(loss[6]) and torch.isfinite(loss[torch.arange(8) != 6]).all()


def test_errors():
    s, t, labels = batch()
    for bad in (0, 0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"label_revision .* must be in \(0, 1\)"):
            kdfast.kd_loss(s, t, labels=labels, label_revision=bad)
    with pytest.raises(ValueError, match="must be finite"):
        kdfast.kd_loss(s, t, labels=labels, label_revision=math.nan)
    with pytest.raises(TypeError, match="must be a real number"):
        kdfast.kd_loss(s, t, labels=labels, label_revision=True)
    with pytest.raises(ValueError, match="label_revision=0.9 needs labels"):
        kdfast.kd_loss(s, t, label_revision=0.9)
    labels_bad = labels.clone()
    labels_bad[0] = 11
    with pytest.raises(ValueError, match="label 11 at row 0 is outside"):
        kdfast.kd_loss(s, t, labels=labels_bad, label_revision=0.9, backend="torch")


def test_auto_runs_the_fused_kernel_and_right_rows_are_the_unrevised_loss(monkeypatch):
    s, t, labels = batch()
    s32, t32 = s.float(), t.float()
    want = kdfast.kd_loss(s32, t32, 2.0, labels=labels, label_revision=0.9, backend="torch")
    torch.testing.assert_close(kdfast.kd_loss(s32, t32, 2.0, labels=labels, label_revision=0.9), want)
    monkeypatch.setenv("KDFAST_BACKEND", "torch")
    assert torch.equal(kdfast.kd_loss(s32, t32, 2.0, labels=labels, label_revision=0.9), want)


def test_the_option_is_opt_in():
    """distill_loss and the TTM forms take it; the LLM losses (whose kernels lack it) refuse it; the common
    options table is unchanged."""
    assert "label_revision" not in {o.name for o in LOSS_OPTIONS}
    for fn in (kdfast.distill_loss, kdfast.kd_loss, kdfast.ttm_loss, kdfast.wttm_loss):
        assert inspect.signature(fn).parameters["label_revision"].default is None
        assert "label_revision=None: Label Revision" in inspect.getdoc(fn)
    for fn in (kdfast.topk_distill_loss, kdfast.fused_linear_distill_loss, kdfast.vocab_parallel_distill_loss):
        assert "label_revision" not in inspect.signature(fn).parameters
    with pytest.raises(TypeError, match="unexpected keyword argument 'label_revision'"):
        kdfast.vocab_parallel_distill_loss(None, None, label_revision=0.9)
    s, t, labels = batch()
    module = kdfast.KDLoss(temperature=2.0, label_revision=0.9)
    torch.testing.assert_close(module(s, t, labels=labels),
                               kdfast.kd_loss(s, t, 2.0, labels=labels, label_revision=0.9))


# ----------------------------------------------------------------- data selection
def test_selection_scores_and_the_selected_rows():
    t = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 9.0],
                      [2.0, 0.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 0, -100, 0])
    scores = selection_scores(t, labels)
    p = torch.softmax(t, -1)
    want = (p - torch.nn.functional.one_hot(labels.clamp(min=0), 3)).square().sum(-1)
    want[4] = 0
    torch.testing.assert_close(scores, want)
    # 5 labelled rows; order of scores: row0 < row5 < row3 < row2 < row1
    assert select_for_distillation(t, labels, 0.6).tolist() == [1, 0, 0, 1, 1, 1]
    assert select_for_distillation(t, labels, 1.0).tolist() == [1] * 6
    assert select_for_distillation(t, labels, 0.01).tolist() == [1, 0, 0, 0, 1, 0]
    # ties go to the earlier row; given scores
    assert select_for_distillation(t, labels, 0.4, scores=torch.zeros(6)).tolist() == [1, 1, 0, 0, 1, 0]
    # no labelled row: everything kept
    assert select_for_distillation(t, torch.full((6,), -100), 0.5).tolist() == [1] * 6
    for bad in (0.0, 1.5, -1):
        with pytest.raises(ValueError, match=r"fraction .* must be in \(0, 1\]"):
            select_for_distillation(t, labels, bad)
    with pytest.raises(ValueError, match="label 3 at row 0 is outside"):
        select_for_distillation(t, torch.tensor([3, 0, 0, 0, 0, 0]), 0.5)
    with pytest.raises(ValueError, match="scores must have one entry per row"):
        select_for_distillation(t, labels, 0.5, scores=torch.zeros(5))
    with pytest.raises(ValueError, match="eta must be in"):
        revised_teacher_probs(t, labels, 1.0)


def test_the_selection_is_a_weighting_of_the_loss():
    s, t, labels = batch(seed=17)
    w = select_for_distillation(t, labels, 0.5)
    got = kdfast.kd_loss(s, t, 4.0, labels=labels, label_revision=0.9, weighting=w, reduction="none")
    full = kdfast.kd_loss(s, t, 4.0, labels=labels, label_revision=0.9, reduction="none")
    torch.testing.assert_close(got, full * w.double())
    assert 0 < int((w[labels != -100] == 0).sum()) < int((labels != -100).sum())


# ----------------------------------------------------------------- the trainer and the experiment
def test_the_trainer_objective():
    from kdfast.train import resolve_loss

    s, t, labels = batch(seed=19, dtype=torch.float32)
    s[3, 5:] = 0.0  # finite student logits everywhere (the trainer's students)
    objective = resolve_loss({"name": "kd", "temperature": 4.0, "label_revision": 0.9})
    assert objective.uses_row_labels and not objective.needs_labels
    # masked by the labels: the loss on the labelled rows
    got = objective(s, t, labels, normalizer=10.0)
    want = kdfast.kd_loss(s, t, 4.0, labels=labels, label_revision=0.9, reduction="sum") / 10.0
    torch.testing.assert_close(got, want)
    # distilling the unlabelled rows too: those as plain KD, the labelled ones revised
    got = objective(s, t, None, normalizer=10.0, row_labels=labels)
    plain = kdfast.kd_loss(s, t, 4.0, reduction="none")
    revised = kdfast.kd_loss(s, t, 4.0, labels=labels, label_revision=0.9, reduction="none")
    torch.testing.assert_close(got, torch.where(labels == -100, plain, revised).sum() / 10.0)
    with pytest.raises(ValueError, match="needs the rows' labels"):
        objective(s, t, None, normalizer=1.0)
    # data selection
    both = resolve_loss({"name": "kd", "temperature": 4.0, "label_revision": 0.9, "data_selection": 0.5})
    w = select_for_distillation(t, labels, 0.5)
    got = both(s, t, None, normalizer=10.0, row_labels=labels)
    torch.testing.assert_close(got, (torch.where(labels == -100, plain, revised) * w).sum() / 10.0)
    assert "data_selection" in repr(both)
    with pytest.raises(ValueError, match=r"data_selection .* must be in \(0, 1\]"):
        resolve_loss({"name": "kd", "data_selection": 0.0})
    with pytest.raises(ValueError, match="data_selection needs a row-wise kdfast loss"):
        resolve_loss({"name": "dkd", "data_selection": 0.5})
    with pytest.raises(ValueError, match=r"label_revision .* must be in \(0, 1\)"):
        resolve_loss({"name": "kd", "label_revision": 2.0})


def test_the_distiller_revises_the_labelled_rows_of_the_transfer_set():
    from torch.utils.data import DataLoader, TensorDataset

    from kdfast.train import Distiller

    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randint(0, 5, (32,))
    y[::2] = -100
    teacher, student = torch.nn.Linear(8, 5), torch.nn.Linear(8, 5)
    spec = {"name": "kd", "temperature": 4.0, "label_revision": 0.9, "data_selection": 0.8}
    distiller = Distiller(student, teacher, spec, optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
                          distill_unlabeled=True, device="cpu")
    records = distiller.fit(DataLoader(TensorDataset(x, y), batch_size=16), 1, progress=False)
    assert math.isfinite(records[-1]["losses"]["soft"]) and records[-1]["losses"]["soft"] > 0


def test_the_experiment_runs_kd_with_label_revision_and_data_selection_against_kd():
    from kdfast.experiments.claims import CLAIMS
    from kdfast.experiments.methods import METHODS, get_method

    lr, ds, kd = METHODS["kd-lr"], METHODS["kd-lr-ds"], METHODS["kd"]
    assert lr.loss == {**kd.loss, "label_revision": 0.9} and (lr.hard_weight, lr.soft_weight) == (0.1, 0.9)
    assert ds.loss == {**kd.loss, "label_revision": 0.9, "data_selection": 0.8}
    assert get_method("kd-lr-ds", {"kd-lr-ds": {"data_selection": 0.5}}).loss["data_selection"] == 0.5
    claims = {c.name: c for c in CLAIMS}
    assert (claims["label-revision"].treatment, claims["label-revision"].baseline) == ("kd-lr@ce", "kd@ce")
    assert "500 labelled rows" in claims["label-revision"].statement
    assert claims["label-revision-data-selection"].treatment == "kd-lr-ds@ce"


# ----------------------------------------------------------------- the fused kernels
fused_kernels = pytest.mark.parametrize("kernel", KERNELS or [pytest.param("none", marks=pytest.mark.skip(
    reason="no fused backend here"))])


def _run(kernel, s, t, labels, **kw):
    device = kernel_device(kernel) if kernel != "torch" else torch.device("cpu")
    x = s.clone().to(device).requires_grad_(True)
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    with kernel_backend(kernel) as backend:
        loss = kdfast.distill_loss(x, t.to(device), labels=labels.to(device), backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach().cpu(), grad.cpu()


@fused_kernels
@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_the_kernels_are_the_reference_in_float64(kernel, name):
    s, t, labels = batch(N=8, V=700, seed=23)  # V spans two interpreter tiles
    kw = dict(divergence=name, temperature=2.0, label_revision=0.85, reduction="none", **PARAMS.get(name, {}))
    got, want = _run(kernel, s, t, labels, **kw), _run("torch", s, t, labels, **kw)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)
    # right and ignored rows are those of the unrevised loss
    plain = _run(kernel, s, t, labels, **{k: v for k, v in kw.items() if k != "label_revision"})
    untouched = ~teacher_is_wrong(t, labels)
    assert torch.equal(got[0][untouched], plain[0][untouched])
    assert torch.equal(got[1][untouched], plain[1][untouched])
    assert not torch.equal(got[0], plain[0])


@fused_kernels
@pytest.mark.parametrize("options", [dict(hard_weight=0.5, reduction="batchmean"),
                                     dict(hard_weight=0.2, student_temperature=1.0, reduction="sum"),
                                     dict(weighting="wttm", normalizer=3.0),
                                     dict(weighting="entropy", divergence="jsd"),
                                     dict(given=True, ignore_index=-1)])
def test_kernel_options(kernel, options):
    s, t, labels = batch(N=8, V=600, seed=29)
    options = dict(options)
    if options.pop("given", False):
        options["weighting"] = torch.linspace(0, 2, 8, dtype=torch.float64)
        labels = torch.where(labels == -100, -1, labels)
    kw = dict(temperature=3.0, label_revision=0.6, **options)
    got, want = _run(kernel, s, t, labels, **kw), _run("torch", s, t, labels, **kw)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)


@fused_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["kl", "jsd", "tvd", "reverse_kl", "renyi"])
def test_float32_and_bfloat16_against_the_float64_reference(kernel, dtype, name):
    # V = 600: not a multiple of the vector width (the label's lane is patched in a tail or a full vector)
    s, t, labels = batch(N=8, V=600, seed=31)
    s, t = s.to(dtype), t.to(dtype)
    kw = dict(divergence=name, temperature=2.0, label_revision=0.9, hard_weight=0.1, reduction="none")
    got = _run(kernel, s, t, labels, **kw)
    want = _run("torch", s.double(), t.double(), labels, **kw)
    tol = GRAD_TOL[dtype]
    torch.testing.assert_close(got[0], want[0].float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1].double(), want[1], rtol=tol["rtol"],
                               atol=tol["atol"] * float(want[1].abs().max()) + tol["atol_abs"])


@triton_only
def test_triton_opcheck_without_a_gradient_and_errors():
    from kdfast.ops.fused_op import loss_arguments
    from kdfast.config import make_config
    from kdfast.ops.triton.op import distill_forward_revised_triton

    s, t, labels = batch(N=6, V=37, seed=37, dtype=torch.float32)
    s, t, labels = s.to(DEVICE), t.to(DEVICE), labels.to(DEVICE)
    for kw in (dict(temperature=2.0, hard_weight=0.5), dict(divergence="jsd", reduction="none")):
        cfg = make_config(s, t, labels=labels, label_revision=0.9, **kw)
        for grad in (True, False):
            args = (s, t, *loss_arguments(cfg), grad, 0.9)
            torch.library.opcheck(distill_forward_revised_triton, args, test_utils=("test_schema", "test_faketensor"))
    with torch.no_grad():
        got = kdfast.kd_loss(s, t, 2.0, labels=labels, label_revision=0.9, backend="triton")
    torch.testing.assert_close(got.cpu(), kdfast.kd_loss(s.cpu(), t.cpu(), 2.0, labels=labels.cpu(),
                                                         label_revision=0.9, backend="torch"), rtol=1e-5, atol=1e-6)
    cfg = make_config(s, t, labels=labels)
    with pytest.raises(ValueError, match="label_revision must be in"):
        distill_forward_revised_triton(s, t, *loss_arguments(cfg), False, 1.0)
    with pytest.raises(ValueError, match="label_revision needs labels"):
        distill_forward_revised_triton(s, t, None, *loss_arguments(cfg)[1:], False, 0.5)


@pytest.mark.skipif("cpu" not in FUSED_BACKENDS, reason="the C++ extension is not built")
def test_cpu_opcheck_compile_and_errors():
    from kdfast.config import make_config
    from kdfast.ops.fused_op import loss_arguments

    op = torch.ops.kdfast.distill_forward_revised
    s, t, labels = batch(N=6, V=37, seed=37, dtype=torch.float32)
    for kw in (dict(temperature=2.0, hard_weight=0.5), dict(divergence="jsd", reduction="none")):
        cfg = make_config(s, t, labels=labels, label_revision=0.9, **kw)
        for grad in (True, False):
            torch.library.opcheck(op, (s, t, *loss_arguments(cfg), grad, 0.9),
                                  test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    x = s.clone().requires_grad_(True)
    compiled = torch.compile(lambda a: kdfast.kd_loss(a, t, 2.0, labels=labels, label_revision=0.9, backend="cpu"),
                             fullgraph=True, backend="aot_eager")
    (g_compiled,) = torch.autograd.grad(compiled(x), x)
    (g_eager,) = torch.autograd.grad(kdfast.kd_loss(x, t, 2.0, labels=labels, label_revision=0.9, backend="cpu"), x)
    assert torch.equal(g_compiled, g_eager)
    cfg = make_config(s, t, labels=labels)
    with pytest.raises(ValueError, match="label_revision must be in"):
        op(s, t, *loss_arguments(cfg), False, 1.0)
    with pytest.raises(ValueError, match="label_revision needs labels"):
        op(s, t, None, *loss_arguments(cfg)[1:], False, 0.5)


@fused_kernels
def test_huge_logits_and_a_label_in_the_tail(kernel):
    """Logits of 1e6 (the kernels subtract the max before scaling) and a wrong label in the last vector's tail."""
    s, t, labels = batch(N=8, V=37, seed=41)
    s, t = s * 1e5, t * 1e5
    labels[6] = 36
    t[6, 36] = t[6].min() - 1.0  # wrong
    for name in ("kl", "jsd"):
        kw = dict(divergence=name, temperature=2.0, label_revision=0.7, reduction="none")
        got, want = _run(kernel, s.float(), t.float(), labels, **kw), _run("torch", s.float().double(),
                                                                         t.float().double(), labels, **kw)
        torch.testing.assert_close(got[0].double(), want[0], rtol=2e-5, atol=1e-5)
        torch.testing.assert_close(got[1].double(), want[1], rtol=2e-5, atol=1e-5 * max(1.0, float(want[1].abs().max())))
