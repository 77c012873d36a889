"""kdfast.train.objectives: loss specs, the sum / normalizer convention, the hard losses."""

import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast.train import objectives
from kdfast.train.objectives import resolve_loss


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(n=6, v=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(n, v, generator=g) * 2, torch.randn(n, v, generator=g) * 2
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1] = -100
    return s, t, labels


@pytest.mark.parametrize("spec, direct", [
    ("kd", lambda s, t, y: kdfast.kd_loss(s, t, labels=y)),
    ({"name": "kd", "temperature": 3.0}, lambda s, t, y: kdfast.kd_loss(s, t, 3.0, labels=y)),
    ({"name": "distill", "divergence": "jsd", "weighting": "entropy"},
     lambda s, t, y: kdfast.distill_loss(s, t, divergence="jsd", weighting="entropy", labels=y)),
    ("wttm", lambda s, t, y: kdfast.wttm_loss(s, t, labels=y)),
    ({"name": "dkd", "temperature": 2.0}, lambda s, t, y: kdfast.dkd_loss(s, t, y, temperature=2.0)),
    ("dist", lambda s, t, y: kdfast.dist_loss(s[y != -100], t[y != -100])),
    ("correlation", lambda s, t, y: kdfast.correlation_loss(s[y != -100], t[y != -100])),
])
def test_objective_is_the_kdfast_loss_with_a_global_normaliser(spec, direct):
    s, t, labels = _batch()
    objective = resolve_loss(spec)
    valid = int((labels != -100).sum())
    expected = direct(s, t, labels)
    torch.testing.assert_close(objective(s, t, labels, normalizer=valid), expected.float())
    # A global count twice as large (another micro-batch of the same size) halves this share.
    torch.testing.assert_close(objective(s, t, labels, normalizer=2 * valid), expected.float() / 2)


def test_callable_loss_is_scaled_from_its_mean():
    s, t, labels = _batch()

    def mse(student, teacher, y):
        return (student - teacher).square().mean()

    objective = resolve_loss(mse)
    assert objective.name == "mse" and objective.kind == "callable"
    torch.testing.assert_close(objective(s, t, labels, normalizer=10.0), mse(s, t, labels) * 5 / 10)


def test_per_row_weights_go_to_rowwise_losses_only():
    s, t, labels = _batch()
    w = torch.linspace(0.1, 1.0, 6)
    got = resolve_loss("kd")(s, t, labels, weights=w, normalizer=5.0)
    torch.testing.assert_close(got, kdfast.kd_loss(s, t, labels=labels, weighting=w, normalizer=5.0))
    for spec in ("wttm", "dist", {"name": "distill", "weighting": "entropy"}):
        with pytest.raises(ValueError, match="per-sample teacher weights"):
            resolve_loss(spec)(s, t, labels, weights=w, normalizer=5.0)


def test_a_batch_without_valid_rows_gives_zero_with_a_graph():
    s, t, _ = _batch()
    s.requires_grad_(True)
    out = resolve_loss("dkd")(s, t, torch.full((6,), -100), normalizer=1.0)
    out.backward()
    assert float(out) == 0.0 and torch.count_nonzero(s.grad) == 0


def test_bad_specs_fail_at_construction_with_clear_messages():
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        resolve_loss("nope")
    with pytest.raises(ValueError, match="needs a 'name'"):
        resolve_loss({"temperature": 2.0})
    with pytest.raises(ValueError, match="set by the trainer"):
        resolve_loss({"name": "kd", "reduction": "sum"})
    with pytest.raises(ValueError, match="divergence"):
        resolve_loss({"name": "distill", "divergence": "wasserstein"})
    with pytest.raises(ValueError, match="temperature"):
        resolve_loss({"name": "dist", "temperature": -1.0})
    with pytest.raises(TypeError, match="loss must be"):
        resolve_loss(3)
    with pytest.raises(ValueError, match="needs labels"):
        resolve_loss("dkd")(torch.zeros(2, 3), torch.zeros(2, 3), None, normalizer=1.0)


def test_hard_losses():
    s, _, labels = _batch()
    torch.testing.assert_close(objectives.hard_loss_sum("ce", s, labels, -100),
                               F.cross_entropy(s, labels, ignore_index=-100, reduction="sum"))
    # Two classes, equal logits: softmax (1/2, 1/2) against one-hot (1, 0) gives 1/4 + 1/4 per row.
    z = torch.zeros(3, 2)
    y = torch.tensor([0, 1, -100])
    assert float(objectives.hard_loss_sum("mse", z, y, -100)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="hard_loss"):
        objectives.hard_loss_sum("hinge", z, y, -100)


def test_softmax_mse_is_mean_teachers_consistency():
    s, t, labels = _batch()
    objective = resolve_loss({"name": "softmax_mse"})
    assert objective.kind == "rowwise" and objective.accepts_weights and not objective.needs_labels
    per_row = (torch.softmax(s, -1) - torch.softmax(t, -1)).square().mean(-1)
    valid = labels != -100
    torch.testing.assert_close(objective(s, t, labels, normalizer=4.0), per_row[valid].sum() / 4.0)
    torch.testing.assert_close(objective(s, t, None, normalizer=6.0), per_row.mean())
    w = torch.linspace(0.1, 1.0, 6)
    torch.testing.assert_close(objective(s, t, None, weights=w, normalizer=6.0), (per_row * w).mean())
    hot = resolve_loss({"name": "softmax_mse", "temperature": 2.0})(s, t, None, normalizer=6.0)
    torch.testing.assert_close(hot, (torch.softmax(s / 2, -1) - torch.softmax(t / 2, -1)).square().mean(-1).mean())
    s.requires_grad_(True)
    t.requires_grad_(True)
    objective(s, t, None, normalizer=6.0).backward()
    assert s.grad is not None and t.grad is None  # the teacher gets no gradient
    with pytest.raises(ValueError, match="temperature"):
        resolve_loss({"name": "softmax_mse", "temperature": 0.0})
