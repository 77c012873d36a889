"""One case of every Triton kernel family against the float64 reference.

Small enough to run under another Triton version in CI (``.ci/run`` runs it
with Triton 3.6.0, the GPU machine's version, next to the suite's own Triton):
every divergence once, the weightings and the hard-label term, DIST, DKD,
the correlation loss, both top-k tails (the teacher rows' kernel, the bucket
op) and one fused-linear chunk.  Interpreted on CPU tensors
without a GPU, on CUDA tensors with one.
"""

import pytest
import torch

import kdfast
from kdfast.registry import divergence_cases
from conftest import FUSED_BACKENDS, assert_matches_oracle, kernel_device, logits

pytestmark = pytest.mark.skipif("triton" not in FUSED_BACKENDS, reason="triton cannot run here")

DIVERGENCES = divergence_cases(all_cases=False)


@pytest.mark.parametrize("divergence,params", DIVERGENCES, ids=[d for d, _ in DIVERGENCES])
def test_every_divergence(divergence, params):
    # V spans two interpreter tiles and a partial third one
    s, t = logits((3, 1100), seed=1), logits((3, 1100), seed=2)
    assert_matches_oracle(s, t, "triton", divergence=divergence, temperature=2.0, **params)


@pytest.mark.parametrize("weighting", ["wttm", "entropy"])
def test_weightings_and_the_hard_label_term(weighting):
    s, t = logits((4, 300), seed=3), logits((4, 300), seed=4)
    assert_matches_oracle(s, t, "triton", weighting=weighting, temperature=3.0, student_temperature=2.0,
                          labels=torch.tensor([1, -100, 7, 299]), hard_weight=0.5)


def _family_vs_reference(fn):
    device = kernel_device("triton")
    s, t = logits((5, 40), seed=5).to(device), logits((5, 40), seed=6).to(device)
    got_s = s.clone().requires_grad_(True)
    got = fn(got_s, t, "triton")
    got.backward()
    ref_s = s.double().cpu().requires_grad_(True)
    ref = fn(ref_s, t.double().cpu(), "torch")
    ref.backward()
    torch.testing.assert_close(got.detach().double().cpu(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_s.grad.double().cpu(), ref_s.grad, rtol=1e-4, atol=1e-6)


def test_dist():
    _family_vs_reference(lambda s, t, b: kdfast.dist_loss(s, t, 2.0, backend=b))


def test_dkd():
    _family_vs_reference(lambda s, t, b: kdfast.dkd_loss(s, t, torch.arange(5, device=s.device) * 3, 2.0,
                                                         backend=b))


def test_correlation():
    _family_vs_reference(lambda s, t, b: kdfast.correlation_loss(s, t, 1.0, weighting="entropy", backend=b))


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_topk(tail):
    from kdfast.llm.topk import topk_distill_loss

    lp, idx = torch.log_softmax(logits((4, 40), torch.float64, seed=9), -1).topk(6, -1)
    labels = torch.tensor([1, -100, 7, 39])
    _family_vs_reference(lambda s, t, b: topk_distill_loss(s[:4], idx.to(s.device), lp.float().to(s.device), tail=tail,
                                                           temperature=2.0, labels=labels.to(s.device),
                                                           hard_weight=0.5, backend=b))


def test_one_fused_linear_chunk():
    device = kernel_device("triton")
    g = torch.Generator().manual_seed(7)
    h, w = torch.randn(6, 16, generator=g), torch.randn(70, 16, generator=g)
    th, tw = torch.randn(6, 24, generator=g), torch.randn(70, 24, generator=g)
    got_h = h.to(device).clone().requires_grad_(True)
    got = kdfast.fused_linear_distill_loss(got_h, w.to(device), th.to(device), tw.to(device), temperature=2.0,
                                           backend="triton", chunk_size=16)
    got.backward()
    ref_h = h.double().requires_grad_(True)
    ref = kdfast.distill_loss(ref_h @ w.double().T, th.double() @ tw.double().T, temperature=2.0, backend="torch")
    ref.backward()
    torch.testing.assert_close(got.detach().double().cpu(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_h.grad.double().cpu(), ref_h.grad, rtol=1e-4, atol=1e-6)
