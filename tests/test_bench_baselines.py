"""The plain-PyTorch baselines of ``kdfast bench`` (kdfast/bench/baselines.py): each computes kdfast's loss.

A baseline that computed a different loss would make every speed-up of the
benchmark meaningless, so each is checked against kdfast's reference in
float64, values and gradients.
"""

import pytest
import torch

import kdfast
from kdfast.bench import baselines as plain
from kdfast.bench.families import fused_linear_topk_inputs, materialised_kl, materialised_topk, topk_inputs


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
    s, t = _random_case()
    got = _value_and_grad(lambda x: plain.plain_loss(x, t, **options), s)
    want = _value_and_grad(lambda x: kdfast.distill_loss(x, t, backend="torch", **options), s)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)


def test_every_divergence_has_a_plain_form():
    assert set(plain.DIVERGENCE_ROWS) == set(kdfast.DIVERGENCES)


def test_plain_forms_accumulate_16_bit_logits_in_float32():
    s, t = _random_case(seed=1)
    for options in PLAIN_CASES[:8]:
        got = plain.plain_loss(s.bfloat16(), t.bfloat16(), **options)
        want = kdfast.distill_loss(s.bfloat16(), t.bfloat16(), backend="torch", **options)
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dkd_plain_form_is_mdistillers_and_kdfasts_loss():
    s, t = _random_case(seed=2, shape=(9, 12))
    labels = torch.arange(9) % 12
    got = _value_and_grad(lambda x: plain.dkd_mdistiller(x, t, labels, 3.0, 1.0, 8.0), s)
    want = _value_and_grad(lambda x: kdfast.dkd_loss(x, t, labels, 3.0, 1.0, 8.0, backend="torch"), s)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)


def test_dist_and_correlation_plain_forms_are_the_references():
    s, t = _random_case(seed=3, shape=(6, 10))
    torch.testing.assert_close(plain.plain_other_loss("dist")(s, t, 2.0, 1.0, 1.0),
                               kdfast.dist_loss(s, t, 2.0, backend="torch"))
    torch.testing.assert_close(plain.plain_other_loss("correlation")(s, t, 2.0, 1.0, 1.0, 1.0, None),
                               kdfast.correlation_loss(s, t, 2.0, backend="torch"))


def test_topk_plain_form_is_topk_distill_loss_with_the_renormalised_tail():
    s, idx, lp = topk_inputs(9, 40, 7, torch.float64, torch.device("cpu"))
    s = s.detach()
    got = _value_and_grad(lambda x: plain.plain_topk_loss(x, idx, lp, temperature=2.0, scale=4.0), s)
    want = _value_and_grad(lambda x: kdfast.topk_distill_loss(x, idx, lp, tail="renormalize", temperature=2.0,
                                                              scale=4.0), s)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)


def test_materialised_kl_is_the_fused_linear_loss():
    g = torch.Generator().manual_seed(4)
    hs, ws = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(30, 5, generator=g, dtype=torch.float64)
    ht, wt = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(30, 8, generator=g, dtype=torch.float64)
    got = _value_and_grad(lambda x: materialised_kl(x, ws, ht, wt), hs)
    want = _value_and_grad(lambda x: kdfast.fused_linear_distill_loss(x, ws, ht, wt, backend="torch"), hs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_plain_bucket_form_is_topk_distill_loss_with_the_bucket_tail(temperature):
    s, idx, lp = topk_inputs(9, 40, 7, torch.float64, torch.device("cpu"), seed=5)
    s = s.detach()
    kw = dict(tail="bucket", temperature=temperature, scale=temperature**2)
    got = _value_and_grad(lambda x: plain.plain_topk_loss(x, idx, lp, **kw), s)
    want = _value_and_grad(lambda x: kdfast.topk_distill_loss(x, idx, lp, backend="torch", **kw), s)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)
    assert (got[1] != 0).all()  # unlike the renormalised tail, every logit gets a gradient (the bucket's mass)


def test_topk_plain_bucket_form_accumulates_16_bit_logits_in_float32():
    s, idx, lp = topk_inputs(6, 50, 5, torch.bfloat16, torch.device("cpu"), seed=6)
    got = plain.plain_topk_loss(s.detach(), idx, lp, tail="bucket", temperature=2.0)
    want = kdfast.topk_distill_loss(s.detach(), idx, lp, tail="bucket", temperature=2.0, backend="torch")
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_topk_plain_form_refuses_an_unknown_tail():
    s, idx, lp = topk_inputs(2, 10, 3, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="tail"):
        plain.plain_topk_loss(s, idx, lp, tail="drop")


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_materialised_topk_is_the_fused_linear_topk_loss(tail):
    x = fused_linear_topk_inputs(6, 5, 30, 4, torch.float64, torch.device("cpu"), seed=7)
    hs, ws, idx, lp = x["student_hidden"].detach(), x["student_weight"].detach(), x["topk_indices"], x["topk_logprobs"]
    assert idx.shape == lp.shape == (6, 4) and lp.dtype == torch.float32 and idx.dtype == torch.int64
    got = _value_and_grad(lambda h: materialised_topk(h, ws, idx, lp, tail=tail), hs)
    want = _value_and_grad(lambda h: kdfast.fused_linear_topk_distill_loss(h, ws, idx, lp, tail=tail), hs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)


def test_the_fused_linear_teacher_top_k_is_the_top_k_of_its_log_softmax_in_chunks(monkeypatch):
    from kdfast.bench import families

    monkeypatch.setattr(families, "TEACHER_ROWS_PER_CHUNK", 4)  # 10 rows: three chunks
    x = families.fused_linear_inputs(10, 6, 50, torch.float32, torch.device("cpu"), seed=8)
    got = fused_linear_topk_inputs(10, 6, 50, 5, torch.float32, torch.device("cpu"), seed=8)
    want = torch.log_softmax(x["teacher_hidden"] @ x["teacher_weight"].T, -1).topk(5, -1)
    torch.testing.assert_close(got["topk_logprobs"], want.values)
    assert torch.equal(got["topk_indices"], want.indices)
    assert torch.equal(got["student_hidden"], x["student_hidden"])
