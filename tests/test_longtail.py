"""Long-tailed KD (kdfast.longtail), its trainer objective and its experiment, ``kdfast distill-longtail``."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast.longtail import LTKDLoss, kd_group_decomposition, ltkd_loss, rebalanced_group_target

torch.set_num_threads(1)

GROUPS = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]  # head / medium / tail of 10 classes
INF = math.inf


def rand(*shape, seed=0, scale=2.0, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_(requires_grad)


def plain_kl(zs, zt, tau):
    """Per-row KL(softmax(zt/tau) || softmax(zs/tau)), by torch's own kl_div."""
    return F.kl_div(torch.log_softmax(zs / tau, -1), torch.log_softmax(zt / tau, -1), log_target=True,
                    reduction="none").sum(-1)


def brute_force_ltkd(zs, zt, groups, tau, a=1.0, b=1.0, rebalance=True, uniform=True):
    """LTKD per row with explicit loops over rows, groups and classes (finite logits only)."""
    p, q = torch.softmax(zt / tau, -1), torch.softmax(zs / tau, -1)
    G = max(groups) + 1
    members = [[c for c, g in enumerate(groups) if g == k] for k in range(G)]
    P = torch.stack([p[:, m].sum(-1) for m in members], -1)
    Q = torch.stack([q[:, m].sum(-1) for m in members], -1)
    if rebalance is True:
        target = P / P.mean(0)
    elif rebalance is False:
        target = P
    else:
        target = P / rebalance
    target = target / target.sum(-1, keepdim=True)
    rows = []
    for i in range(zs.shape[0]):
        inter = sum(target[i, k] * torch.log(target[i, k] / Q[i, k]) for k in range(G))
        intra = 0.0
        for k in range(G):
            kl_k = sum(p[i, c] / P[i, k] * torch.log((p[i, c] / P[i, k]) / (q[i, c] / Q[i, k])) for c in members[k])
            intra = intra + (1.0 if uniform else P[i, k]) * kl_k
        rows.append(tau * tau * (a * inter + b * intra))
    return torch.stack(rows)


# ----------------------------------------------------------------- the formula
@pytest.mark.parametrize("groups", [GROUPS, [0] * 10, list(range(10)), [2, 0, 1, 0, 2, 2, 1, 0, 1, 2]])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_group_decomposition_adds_up_to_kl_in_float64(groups, tau):
    zs, zt = rand(7, 10, seed=1), rand(7, 10, seed=2, scale=4.0)
    d = kd_group_decomposition(zs, zt, groups, tau)
    assert d.inter.dtype == torch.float64 and d.intra.shape == (7, max(groups) + 1)
    torch.testing.assert_close(d.inter + (d.teacher_groups * d.intra).sum(-1), plain_kl(zs, zt, tau),
                               rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(d.teacher_groups.sum(-1), torch.ones(7, dtype=torch.float64))
    if len(set(groups)) == 1:  # one group: all of KL is within it
        assert torch.all(d.inter.abs() < 1e-14)
    if len(set(groups)) == 10:  # one class per group: all of KL is between groups
        assert torch.all(d.intra.abs() < 1e-14)


def test_the_identity_holds_with_masked_classes_and_an_empty_group():
    zs, zt = rand(5, 10, seed=3), rand(5, 10, seed=4)
    zs[:, 9] = zt[:, 9] = -INF  # a class masked in both
    zt[0, 3] = -INF             # a class only the teacher masks
    d = kd_group_decomposition(zs, zt, GROUPS, 2.0, num_groups=5)  # groups 3 and 4 have no classes
    # kdfast's KL (torch's kl_div gives NaN for a class both mask: 0 * (-inf - -inf))
    kl = kdfast.kd_loss(zs, zt, temperature=2.0, reduction="none") / 4.0
    assert torch.isfinite(kl).all()
    torch.testing.assert_close(d.inter + (d.teacher_groups * d.intra).sum(-1), kl)
    assert torch.all(d.intra[:, 3:] == 0) and torch.all(d.teacher_groups[:, 3:] == 0)


def test_ltkd_without_its_two_corrections_is_exactly_kd():
    zs, zt = rand(2, 6, 10, seed=5), rand(2, 6, 10, seed=6, scale=3.0)
    for tau in (1.0, 3.0):
        for reduction in ("batchmean", "sum", "none"):
            got = ltkd_loss(zs, zt, GROUPS, tau, rebalance=False, intra_weighting="teacher", reduction=reduction)
            torch.testing.assert_close(got, kdfast.kd_loss(zs, zt, temperature=tau, reduction=reduction))


@pytest.mark.parametrize("rebalance", [True, False, "prior"])
@pytest.mark.parametrize("uniform", [True, False])
def test_ltkd_matches_the_explicit_formula(rebalance, uniform):
    zs, zt = rand(9, 10, seed=7), rand(9, 10, seed=8, scale=3.0)
    prior = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    option = prior if rebalance == "prior" else rebalance
    got = ltkd_loss(zs, zt, GROUPS, 4.0, 0.5, 2.0, option, intra_weighting="uniform" if uniform else "teacher",
                    reduction="none")
    want = brute_force_ltkd(zs, zt, GROUPS, 4.0, 0.5, 2.0, option, uniform)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_rebalancing_flattens_a_head_biased_teacher():
    groups = torch.tensor(GROUPS)
    fair = rand(64, 10, seed=9)
    bias = torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64)[groups]  # extra logit on head (and medium) classes
    biased = fair + bias
    P = kd_group_decomposition(biased, biased, groups, 1.0).teacher_groups
    target = rebalanced_group_target(biased, groups, 1.0)
    assert P.mean(0)[0] > 0.6  # the teacher's mass sits on the head group (3 of the 10 classes)
    # Rebalanced, the batch's mean target is much nearer uniform, and the tail gains what the head loses.
    assert (target.mean(0) - 1 / 3).abs().max() < 0.5 * (P.mean(0) - 1 / 3).abs().max()
    assert target.mean(0)[0] < P.mean(0)[0] and target.mean(0)[2] > P.mean(0)[2]
    # A prior holding the bias's factor recovers the unbiased teacher's group distribution exactly.
    fair_P = kd_group_decomposition(fair, fair, groups, 1.0).teacher_groups
    uniform_prior = rebalanced_group_target(biased, groups, 1.0, rebalance=torch.exp(torch.tensor([3.0, 1.0, 0.0])))
    torch.testing.assert_close(uniform_prior, fair_P)
    # No rebalancing: the target is the teacher's own group distribution; one group: nothing to rebalance.
    torch.testing.assert_close(rebalanced_group_target(biased, groups, 1.0, rebalance=False), P)
    assert torch.all(rebalanced_group_target(biased, [0] * 10, 1.0) == 1)


def test_intra_group_terms_are_weighted_uniformly_not_by_the_teacher():
    groups = torch.tensor(GROUPS)
    zt = rand(16, 10, seed=10) + torch.tensor([4.0, 0.0, -2.0], dtype=torch.float64)[groups]  # tail P_g ~ 1e-3
    zs = rand(16, 10, seed=11, requires_grad=True)
    d = kd_group_decomposition(zs, zt, groups, 1.0)
    intra_only = ltkd_loss(zs, zt, groups, 1.0, inter_weight=0.0, reduction="none")
    torch.testing.assert_close(intra_only, d.intra.sum(-1))  # weights 1, 1, 1
    teacher_weighted = ltkd_loss(zs, zt, groups, 1.0, inter_weight=0.0, intra_weighting="teacher", reduction="none")
    torch.testing.assert_close(teacher_weighted, (d.teacher_groups * d.intra).sum(-1))
    # Under the teacher's weights the tail classes get almost no gradient; under uniform weights they get
    # as much as the head classes do.
    (g_uniform,) = torch.autograd.grad(intra_only.sum(), zs)
    (g_teacher,) = torch.autograd.grad(teacher_weighted.sum(), zs)
    tail, head = groups == 2, groups == 0
    assert g_teacher[:, tail].abs().sum() < 0.01 * g_teacher[:, head].abs().sum()
    assert g_uniform[:, tail].abs().sum() > 0.2 * g_uniform[:, head].abs().sum()


# ----------------------------------------------------------------- gradients, masks, reductions
@pytest.mark.parametrize("options", [dict(), dict(rebalance=False), dict(intra_weighting="teacher"),
                                     dict(rebalance=torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)),
                                     dict(inter_weight=0.3, intra_weight=1.7)])
def test_gradcheck_float64(options):
    zs, zt = rand(5, 10, seed=12, requires_grad=True), rand(5, 10, seed=13)
    for reduction in ("batchmean", "sum", "none"):
        assert torch.autograd.gradcheck(lambda s: ltkd_loss(s, zt, GROUPS, 2.0, reduction=reduction, **options), (zs,))


def test_gradcheck_with_masked_classes():
    zt = rand(4, 10, seed=14)
    zt[:, [2, 7]] = -INF
    zt[1, 6:] = -INF  # the teacher has no mass on the tail group in row 1
    mask = torch.isneginf(zt)
    base = rand(4, 10, seed=15)

    def loss(free):
        zs = torch.where(mask, torch.full_like(free, -INF), free)  # the student masks the same classes
        return ltkd_loss(zs, zt, GROUPS, 2.0)

    assert torch.autograd.gradcheck(loss, (base.requires_grad_(),))


def test_masked_classes_equal_dropped_classes_and_give_finite_gradients():
    zs, zt = rand(6, 10, seed=16, requires_grad=True), rand(6, 10, seed=17)
    keep = [c for c in range(10) if c not in (1, 8)]
    masked_s = zs.clone()
    masked_s[:, [1, 8]] = -INF
    masked_t = zt.clone()
    masked_t[:, [1, 8]] = -INF
    value = ltkd_loss(masked_s, masked_t, GROUPS, 3.0)
    dropped = ltkd_loss(zs[:, keep], zt[:, keep], [GROUPS[c] for c in keep], 3.0)
    torch.testing.assert_close(value, dropped)
    (grad,) = torch.autograd.grad(value, zs)
    assert torch.isfinite(grad).all() and torch.all(grad[:, [1, 8]] == 0)
    # A whole group masked in both models contributes nothing and stays finite.
    masked_s2, masked_t2 = zs.clone(), zt.clone()
    masked_s2[:, 6:] = -INF
    masked_t2[:, 6:] = -INF
    value = ltkd_loss(masked_s2, masked_t2, GROUPS, 3.0)
    torch.testing.assert_close(value, ltkd_loss(zs[:, :6], zt[:, :6], GROUPS[:6], 3.0, num_groups=3))
    (grad,) = torch.autograd.grad(value, zs)
    assert torch.isfinite(grad).all()


def test_a_student_masking_a_class_the_teacher_holds_is_infinite_not_nan():
    zs, zt = rand(3, 10, seed=18, requires_grad=True), rand(3, 10, seed=19)
    masked = zs.clone()
    masked[0, 4] = -INF
    per_row = ltkd_loss(masked, zt, GROUPS, reduction="none")
    assert per_row[0] == INF and torch.isfinite(per_row[1:]).all()
    (grad,) = torch.autograd.grad(per_row[1:].sum(), zs)
    assert torch.isfinite(grad).all()


def test_a_nan_row_is_nan_and_leaves_the_other_rows_alone():
    zs, zt = rand(4, 10, seed=20, requires_grad=True), rand(4, 10, seed=21)
    bad = zt.clone()
    bad[2, 0] = math.nan
    per_row = ltkd_loss(zs, bad, GROUPS, reduction="none")
    assert torch.isnan(per_row[2]) and torch.isfinite(per_row[[0, 1, 3]]).all()
    # The batch prior is the mean over the defined rows: dropping row 2 changes nothing for the others.
    rest = ltkd_loss(zs[[0, 1, 3]], zt[[0, 1, 3]], GROUPS, reduction="none")
    torch.testing.assert_close(per_row[[0, 1, 3]], rest)
    (grad,) = torch.autograd.grad(per_row.sum(), zs)
    assert torch.isnan(grad[2]).all() and torch.isnan(ltkd_loss(zs, bad, GROUPS))


def test_reductions_shapes_and_dtypes():
    zs, zt = rand(2, 3, 10, seed=22), rand(2, 3, 10, seed=23)
    none = ltkd_loss(zs, zt, GROUPS, reduction="none")
    assert none.shape == (6,)
    torch.testing.assert_close(ltkd_loss(zs, zt, GROUPS, reduction="sum"), none.sum())
    torch.testing.assert_close(ltkd_loss(zs, zt, GROUPS), none.sum() / 6)
    torch.testing.assert_close(ltkd_loss(zs.reshape(6, 10), zt.reshape(6, 10), GROUPS, reduction="none"), none)
    assert ltkd_loss(zs.float(), zt.float(), GROUPS).dtype == torch.float32
    assert ltkd_loss(zs.bfloat16(), zt.bfloat16(), GROUPS).dtype == torch.float32
    torch.testing.assert_close(ltkd_loss(zs.float(), zt.float(), GROUPS).double(), none.sum() / 6, rtol=1e-5,
                               atol=1e-6)
    empty = torch.zeros(0, 10)
    assert ltkd_loss(empty, empty, GROUPS).item() == 0.0
    assert ltkd_loss(empty, empty, GROUPS, reduction="none").shape == (0,)
    # the teacher gets no gradient
    t = zt.clone().requires_grad_()
    s = zs.clone().requires_grad_()
    ltkd_loss(s, t, GROUPS).backward()
    assert t.grad is None and s.grad is not None


def test_the_module_matches_the_function_and_keeps_its_groups_as_buffers():
    zs, zt = rand(5, 10, seed=24), rand(5, 10, seed=25)
    prior = torch.tensor([0.5, 0.3, 0.2])
    module = LTKDLoss(torch.tensor(GROUPS), temperature=2.0, inter_weight=0.5, rebalance=prior)
    torch.testing.assert_close(module(zs, zt), ltkd_loss(zs, zt, GROUPS, 2.0, 0.5, rebalance=prior))
    assert {name for name, _ in module.named_buffers()} == {"groups", "prior"}
    plain = LTKDLoss(GROUPS, reduction="none")
    torch.testing.assert_close(plain(zs, zt), ltkd_loss(zs, zt, GROUPS, reduction="none"))
    assert "rebalance='batch'" in repr(plain)
    assert kdfast.ltkd_loss is ltkd_loss and kdfast.LTKDLoss is LTKDLoss


def test_invalid_arguments_are_clear_errors():
    zs, zt = rand(3, 10, seed=26), rand(3, 10, seed=27)
    cases = [
        (ValueError, "does not match", dict(student_logits=zs[:, :9])),
        (ValueError, "one group id per class", dict(groups=GROUPS[:9])),
        (ValueError, r"groups\[0\] = -1 is negative", dict(groups=[-1] + GROUPS[1:])),
        (ValueError, r"groups\[6\] = 2 is outside \[0, 2\)", dict(num_groups=2)),
        (TypeError, "integer group ids", dict(groups=torch.tensor(GROUPS, dtype=torch.float32))),
        (TypeError, "integer group ids", dict(groups=[0.0] * 10)),
        (ValueError, "temperature must be > 0", dict(temperature=0.0)),
        (ValueError, "temperature must be > 0", dict(temperature=-1.0)),
        (ValueError, "inter_weight must be >= 0", dict(inter_weight=-0.1)),
        (ValueError, "intra_weighting must be one of", dict(intra_weighting="equal")),
        (ValueError, "reduction must be one of", dict(reduction="mean")),
        (ValueError, "one value per group", dict(rebalance=torch.tensor([0.5, 0.5]))),
        (ValueError, "finite and > 0", dict(rebalance=torch.tensor([0.5, 0.5, 0.0]))),
        (ValueError, "rebalance must be", dict(rebalance="training-set")),
        (ValueError, "num_groups must be >= 1", dict(num_groups=0)),
    ]
    for error, message, override in cases:
        args = dict(student_logits=zs, teacher_logits=zt, groups=GROUPS) | override
        with pytest.raises(error, match=message):
            ltkd_loss(**args)
    dead = zt.clone()
    dead[1] = -INF
    with pytest.raises(ValueError, match="teacher_logits row 1 is all -inf"):
        ltkd_loss(zs, dead, GROUPS)
    with pytest.raises(ValueError, match="one group id per class"):
        LTKDLoss(GROUPS)(zs[:, :9], zt[:, :9])


# ----------------------------------------------------------------- the trainer objective
def test_the_trainer_objective_is_ltkd_over_the_valid_rows():
    from kdfast.train import LOSS_NAMES, resolve_loss

    assert "ltkd" in LOSS_NAMES
    objective = resolve_loss({"name": "ltkd", "groups": GROUPS, "temperature": 2.0, "intra_weight": 0.5})
    zs, zt = rand(6, 10, seed=28).float(), rand(6, 10, seed=29).float()
    labels = torch.tensor([1, -100, 3, 4, -100, 9])
    got = objective(zs, zt, labels, normalizer=10.0)
    valid = labels != -100
    want = ltkd_loss(zs[valid], zt[valid], GROUPS, 2.0, intra_weight=0.5) * 4 / 10.0
    torch.testing.assert_close(got, want)
    # bad options fail when the objective is made, with the loss's own message
    with pytest.raises(ValueError, match="one group id per class"):
        resolve_loss({"name": "ltkd", "groups": torch.tensor([[0, 1], [1, 0]])})
    with pytest.raises(ValueError, match="temperature must be > 0"):
        resolve_loss({"name": "ltkd", "groups": GROUPS, "temperature": 0})
    with pytest.raises(TypeError, match="groups"):
        resolve_loss("ltkd")  # no class-to-group map


def test_a_distiller_trains_a_student_with_ltkd():
    from torch.utils.data import DataLoader, TensorDataset

    from kdfast.train import Distiller

    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randint(0, 10, (32,))
    teacher, student = torch.nn.Linear(8, 10), torch.nn.Linear(8, 10)
    before = student.weight.detach().clone()
    distiller = Distiller(student, teacher, {"name": "ltkd", "groups": GROUPS},
                          optimizer=torch.optim.SGD(student.parameters(), lr=0.1), device="cpu")
    records = distiller.fit(DataLoader(TensorDataset(x, y), batch_size=16), 1, progress=False)
    assert math.isfinite(records[-1]["losses"]["soft"]) and records[-1]["losses"]["soft"] > 0
    assert not torch.equal(before, student.weight)


# ----------------------------------------------------------------- the experiment
def test_the_long_tailed_profile_and_groups():
    from kdfast.experiments import longtail as lt

    counts = lt.long_tail_counts(10, 400, 100.0)
    assert counts == [400, 240, 144, 86, 52, 31, 19, 11, 7, 4] and counts[0] / counts[-1] == 100
    assert lt.rank_groups(10) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert lt.rank_groups(6, 3) == [0, 0, 1, 1, 2, 2] and lt.rank_groups(7, 3) == [0, 0, 1, 1, 2, 2, 2]
    # ImageNet-LT's many (> 100) / medium (20-100) / few (< 20) thresholds give the same groups
    assert [0 if n > 100 else 1 if n >= 20 else 2 for n in counts] == lt.rank_groups(10)

    labels = torch.arange(10).repeat_interleave(400)
    images = torch.arange(4000, dtype=torch.float32)[:, None]
    config = lt.LongTailConfig()
    a, b = (lt.long_tailed_split(images, labels, config, seed) for seed in (0, 1))
    assert a.order != b.order and sorted(a.order) == list(range(10))
    for split in (a, b):
        assert [int((split.labels == d).sum()) for d in split.order] == counts
        assert [split.groups[d] for d in split.order] == lt.rank_groups(10)
    fixed = lt.long_tailed_split(images, labels, lt.LongTailConfig(class_order="fixed"), 0)
    assert fixed.order == list(range(10)) and fixed.groups == GROUPS


def test_evaluate_scores_every_class_alike():
    from kdfast.experiments import longtail as lt

    class AlwaysZero(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 10).float()

    labels = torch.tensor([0] * 50 + [c for c in range(1, 10) for _ in range(5)])  # class 0 dominates
    m = lt.evaluate(AlwaysZero(), torch.zeros(len(labels), 3), labels, GROUPS, list(range(10)))
    assert m["balanced_accuracy"] == pytest.approx(0.1)  # plain accuracy would be 50/95
    assert m["head_accuracy"] == pytest.approx(1 / 3) and m["tail_accuracy"] == 0.0
    assert m["predicted_head"] == 1.0 and m["predicted_tail"] == 0.0
    assert m["class_accuracy_by_rank"] == [1.0] + [0.0] * 9


def test_logit_adjusted_ce_adds_tau_log_prior_in_training_only():
    from kdfast.experiments import longtail as lt

    labels = torch.tensor([0] * 6 + [1] * 3 + [2])
    prior = lt.label_prior(labels, 3)
    torch.testing.assert_close(prior, torch.tensor([0.6, 0.3, 0.1]))
    torch.manual_seed(0)
    inner = torch.nn.Linear(4, 3)
    model = lt.LogitAdjusted(inner, prior * 7.0, tau=1.5)  # unnormalised frequencies: only the ratios count
    x = torch.randn(5, 4)
    model.train()
    torch.testing.assert_close(model(x), inner(x) + 1.5 * prior.log())
    model.eval()
    assert torch.equal(model(x), inner(x))  # predictions use f(x) itself
    # CE on the training-mode output is Menon et al.'s logit-adjusted loss, and it reaches f's parameters
    model.train()
    y = torch.tensor([2, 0, 1, 2, 0])
    loss = F.cross_entropy(model(x), y)
    want = -torch.log_softmax(inner(x) + 1.5 * prior.log(), -1).gather(1, y[:, None]).mean()
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert inner.weight.grad is not None and inner.weight.grad.abs().sum() > 0
    assert lt.count_parameters(model) == lt.count_parameters(inner)  # the offset is a buffer
    with pytest.raises(ValueError, match="prior"):
        lt.LogitAdjusted(inner, torch.tensor([0.5, 0.5, 0.0]))
    with pytest.raises(ValueError, match="tau"):
        lt.LogitAdjusted(inner, prior, tau=-1.0)


def test_logit_adjustment_moves_an_imbalanced_classifier_toward_the_rare_class():
    from kdfast.experiments import longtail as lt

    # two overlapping Gaussians, 95 % of the images in class 0: plain CE rarely predicts class 1
    g = torch.Generator().manual_seed(3)
    y = (torch.rand(2000, generator=g) < 0.05).long()
    x = torch.randn(2000, 2, generator=g) + 1.2 * y[:, None].float()
    balanced = torch.cat([torch.zeros(1000, dtype=torch.long), torch.ones(1000, dtype=torch.long)])
    x_test = torch.randn(2000, 2, generator=g) + 1.2 * balanced[:, None].float()

    def recall_of_rare(adjust):
        torch.manual_seed(0)
        f = torch.nn.Linear(2, 2)
        model = lt.LogitAdjusted(f, lt.label_prior(y, 2)) if adjust else f
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        model.train()
        for _ in range(300):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            return float((model(x_test)[1000:].argmax(-1) == 1).double().mean())

    plain, adjusted = recall_of_rare(False), recall_of_rare(True)
    assert plain < 0.3 and adjusted > plain + 0.3


def test_config_errors():
    from kdfast.experiments import longtail as lt

    for bad, message in ((dict(methods=["ce", "dkd"]), "unknown methods"), (dict(seeds=[]), "at least one seed"),
                         (dict(imbalance_ratio=1000.0), "rarest class"), (dict(class_order="random"), "class_order"),
                         (dict(temperature=0.0), "temperature"), (dict(logit_adjustment=-1.0), "logit_adjustment")):
        with pytest.raises(ValueError, match=message):
            lt.LongTailConfig(**bad).check()


def test_quick_run_from_the_command_line(tmp_path, capsys):
    import kdfast.cli
    from kdfast.experiments import longtail as lt

    assert kdfast.cli.COMMANDS["distill-longtail"] is lt and "distill-longtail" in kdfast.cli.EPILOG
    out = tmp_path / "lt"
    started = time.perf_counter()
    assert kdfast.cli.main(["distill-longtail", "--quick", "--out", str(out)]) == 0
    assert time.perf_counter() - started < 60
    result = json.loads((tmp_path / "lt.json").read_text())
    assert (tmp_path / "lt.png").stat().st_size > 0
    assert result["experiment"] == "distill-longtail" and result["config"]["seeds"] == [0, 1]
    assert result["data"]["counts_by_rank"] == [400, 240, 144, 86, 52, 31, 19, 11, 7, 4]
    assert len(result["runs"]) == 2 * (1 + len(lt.METHODS))
    assert set(result["summary"]) == {"teacher", *lt.METHODS}
    for stats in result["summary"].values():
        assert set(lt.METRICS) <= set(stats)
        assert all(0 <= stats[k]["mean"] <= 1 for k in lt.METRICS)
    assert set(result["paired"]["ltkd"]) == {"vs ce", "vs kd", "vs ce-logit-adjusted"}
    assert set(result["paired"]["kd"]) == {"vs ce", "vs ce-logit-adjusted"}
    assert set(result["paired"]["ce-logit-adjusted"]) == {"vs ce", "vs kd"}
    d = result["paired"]["ltkd"]["vs kd"]["balanced_accuracy"]
    assert d["seeds"] == [0, 1] and d["low"] <= d["mean"] <= d["high"]
    assert [c["claim"] for c in result["claims"]] == [c[0] for c in lt.CLAIMS]
    assert {c["verdict"] for c in result["claims"]} <= {"holds", "reversed", "not resolved"}
    printed = capsys.readouterr().out
    assert "| ltkd − kd |" in printed and "| ltkd |" in printed and "| ltkd − ce-logit-adjusted |" in printed
    la = next(c for c in result["claims"] if c["claim"] == "ltkd-beats-logit-adjusted-ce")
    assert la["baseline"] == "ce-logit-adjusted" and la["difference"]["seeds"] == [0, 1]
    # an existing output is kept unless --force (kdfast.cli prints the error, exit status 2)
    assert kdfast.cli.main(["distill-longtail", "--quick", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
