"""The reference against closed forms and against PyTorch's own losses."""

import math

import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast import reference as R
from conftest import logits

ALL = [("kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}), ("tvd", {}), ("renyi", {"alpha": 0.5}),
       ("renyi", {"alpha": 3.0}), ("ab", {"alpha": 0.7, "beta": 0.4}), ("skew_kl", {"skew": 0.2}),
       ("skew_reverse_kl", {"skew": 0.2})]


def ref(s, t, **kw):
    return kdfast.distill_loss(s, t, backend="torch", **kw)


@pytest.mark.parametrize("divergence,params", ALL, ids=str)
def test_identical_rows_have_zero_divergence(divergence, params):
    z = logits((4, 50), torch.float64)
    loss = ref(z, z.clone(), divergence=divergence, reduction="none", **params)
    torch.testing.assert_close(loss, torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("divergence,params", ALL, ids=str)
def test_divergences_are_nonnegative(divergence, params):
    s, t = logits((16, 40), torch.float64, seed=1), logits((16, 40), torch.float64, seed=2)
    assert (ref(s, t, divergence=divergence, reduction="none", **params) >= -1e-12).all()


def test_kl_equals_torch_kl_div():
    s, t = logits((8, 30), torch.float64, seed=1), logits((8, 30), torch.float64, seed=2)
    T = 3.0
    expected = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                        reduction="batchmean") * T * T
    torch.testing.assert_close(kdfast.kd_loss(s, t, temperature=T, backend="torch"), expected)


def test_renyi_tends_to_kl():
    s, t = logits((6, 30), torch.float64, seed=1), logits((6, 30), torch.float64, seed=2)
    kl = ref(s, t, divergence="kl")
    errors = [abs(float(ref(s, t, divergence="renyi", alpha=1 + h) - kl)) for h in (1e-2, 1e-3, 1e-4)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4 * float(kl)
    assert float(ref(s, t, divergence="renyi", alpha=1.0)) == float(kl)  # alpha = 1 is KL exactly


def test_jsd_endpoints_are_kl_and_reverse_kl():
    s, t = logits((6, 30), torch.float64, seed=1), logits((6, 30), torch.float64, seed=2)
    assert float(ref(s, t, divergence="jsd", beta=0.0)) == float(ref(s, t, divergence="kl"))
    assert float(ref(s, t, divergence="jsd", beta=1.0)) == float(ref(s, t, divergence="reverse_kl"))


def test_jsd_matches_its_definition():
    s, t = logits((6, 30), torch.float64, seed=1), logits((6, 30), torch.float64, seed=2)
    p, q = t.softmax(-1), s.softmax(-1)
    b = 0.3
    m = b * p + (1 - b) * q
    expected = (b * (p * (p / m).log()).sum(-1) + (1 - b) * (q * (q / m).log()).sum(-1)).mean()
    torch.testing.assert_close(ref(s, t, divergence="jsd", beta=b), expected)


def test_tvd_renyi_ab_skew_match_their_definitions():
    s, t = logits((6, 30), torch.float64, seed=1), logits((6, 30), torch.float64, seed=2)
    p, q = t.softmax(-1), s.softmax(-1)
    cases = {
        ("tvd", ()): 0.5 * (p - q).abs().sum(-1),
        ("renyi", (("alpha", 2.5),)): (p**2.5 * q**-1.5).sum(-1).log() / 1.5,
        ("ab", (("alpha", 0.7), ("beta", 0.4))): -(p**0.7 * q**0.4 - 0.7 / 1.1 * p**1.1 - 0.4 / 1.1 * q**1.1).sum(-1)
        / 0.28,
        ("skew_kl", (("skew", 0.2),)): (p * (p / (0.2 * p + 0.8 * q)).log()).sum(-1),
        ("skew_reverse_kl", (("skew", 0.2),)): (q * (q / (0.8 * p + 0.2 * q)).log()).sum(-1),
    }
    for (name, params), expected in cases.items():
        got = ref(s, t, divergence=name, reduction="none", **dict(params))
        torch.testing.assert_close(got, expected, msg=name)


def test_ttm_identity():
    """KL(p_T||q) = T KL(p_T||q_T) - (T-1) H_{1/T}(q) + (T-1) H(p_T)   (TTM paper)."""
    s, t = logits((6, 30), torch.float64, seed=1), logits((6, 30), torch.float64, seed=2)
    T = 2.5
    lhs = kdfast.ttm_loss(s, t, temperature=T, reduction="none", backend="torch")
    kl_tt = ref(s, t, temperature=T, reduction="none")
    q = s.softmax(-1)
    renyi_entropy = T / (T - 1) * (q ** (1 / T)).sum(-1).log()  # H_alpha = log(sum q^alpha) / (1 - alpha)
    pT = (t / T).softmax(-1)
    entropy_pT = -(pT * pT.log()).sum(-1)
    rhs = T * kl_tt - (T - 1) * renyi_entropy + (T - 1) * entropy_pT
    torch.testing.assert_close(lhs, rhs)


def test_wttm_weight_is_power_sum():
    t = logits((5, 20), torch.float64)
    T = 3.0
    expected = (t.softmax(-1) ** (1 / T)).sum(-1)
    torch.testing.assert_close(R.wttm_weight(t, T), expected)


def test_entropy_weight():
    t = logits((5, 20), torch.float64)
    p = t.softmax(-1)
    expected = 1 + (p * p.log()).sum(-1) / math.log(20)
    torch.testing.assert_close(R.entropy_weight(t), expected)
    assert float(R.entropy_weight(torch.zeros(1, 20, dtype=torch.float64))) == pytest.approx(0.0, abs=1e-12)
    assert float(R.entropy_weight(torch.zeros(1, 1, dtype=torch.float64))) == 1.0


def test_hard_term_is_cross_entropy():
    s, t = logits((6, 30), torch.float64, seed=1), logits((6, 30), torch.float64, seed=2)
    labels = torch.tensor([1, 2, -100, 4, 29, 0])
    got = ref(s, t, labels=labels, hard_weight=1.0, soft_weight=0.0)
    torch.testing.assert_close(got, F.cross_entropy(s, labels, ignore_index=-100))


def test_normalizer_makes_accumulation_exact():
    s, t = logits((8, 30), torch.float64, seed=1), logits((8, 30), torch.float64, seed=2)
    labels = torch.tensor([1, -100, 3, 4, -100, 6, 7, 8])
    full = ref(s, t, labels=labels, hard_weight=0.5)
    parts = sum(ref(s[i:i + 4], t[i:i + 4], labels=labels[i:i + 4], hard_weight=0.5, normalizer=6) for i in (0, 4))
    torch.testing.assert_close(parts, full)


@pytest.mark.parametrize("divergence,params", ALL, ids=str)
@pytest.mark.parametrize("weighting", [None, "wttm", "entropy"])
def test_reference_gradcheck(divergence, params, weighting):
    s = logits((3, 7), torch.float64, seed=1)
    t = logits((3, 7), torch.float64, seed=2)
    s[0, 2] = t[0, 2] = float("-inf")  # a masked vocabulary entry must not break the gradient
    s.requires_grad_()
    labels = torch.tensor([1, -100, 6])
    fn = lambda x: ref(x, t, divergence=divergence, temperature=1.7, student_temperature=1.3, weighting=weighting,
                       labels=labels, hard_weight=0.5, **params)
    assert torch.autograd.gradcheck(fn, (s,))
