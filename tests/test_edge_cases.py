"""The edge cases of the spec, fused backends against the oracle."""

import pytest
import torch

import kdfast
from kdfast._extension import _C
from conftest import assert_matches_oracle, cpu_capabilities, cpu_capability, logits, loss_and_grad, oracle

DIVS = [("kl", {}), ("reverse_kl", {}), ("jsd", {}), ("tvd", {}), ("renyi", {"alpha": 2.0}),
        ("ab", {"alpha": 0.5, "beta": 0.5}), ("skew_kl", {}), ("skew_reverse_kl", {})]
div_params = pytest.mark.parametrize("divergence,params", DIVS, ids=str)
caps = pytest.mark.parametrize("capability", cpu_capabilities())


@caps
@div_params
@pytest.mark.parametrize("V", [1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 1024, 1025])
def test_vocab_sizes_around_vector_widths(V, divergence, params, capability):
    s, t = logits((3, V), seed=V), logits((3, V), seed=V + 100)
    with cpu_capability(capability):
        assert_matches_oracle(s, t, "cpu", divergence=divergence, temperature=1.5, **params)


@caps
@div_params
def test_masked_vocabulary_entries(divergence, params, capability):
    """-inf logits shared by teacher and student (padded vocabulary) contribute exactly 0."""
    s, t = logits((4, 45), seed=1), logits((4, 45), seed=2)
    s[:, 40:44] = t[:, 40:44] = float("-inf")
    s[1, :44] = t[1, :44] = float("-inf")  # a row with a single live entry
    s[2, ::3] = t[2, ::3] = float("-inf")
    with cpu_capability(capability):
        assert_matches_oracle(s, t, "cpu", divergence=divergence, temperature=2.0, labels=torch.tensor([0, 44, 1, 5]),
                              hard_weight=0.3, **params)


@caps
@pytest.mark.parametrize("divergence", ["kl", "jsd", "tvd", "skew_kl"])
def test_teacher_only_masked_entries(divergence, capability):
    """A teacher entry of -inf (p = 0) where the student has mass is finite for these divergences."""
    s, t = logits((3, 20), seed=1), logits((3, 20), seed=2)
    t[:, 3] = float("-inf")
    with cpu_capability(capability):
        assert_matches_oracle(s, t, "cpu", divergence=divergence)


@caps
@div_params
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_huge_logits(divergence, params, dtype, capability):
    """Logits of +-1e4.  Renyi with alpha > 1 is ill-conditioned there in float32
    (its gradient is exp(x - LSE) with x ~ 2e4, so float32 rounding of x alone is
    ~1e-3): there the gradient must be as close to the float64 oracle as the
    float32 reference itself is (within a factor 2), and the value within 1e-5."""
    g = torch.Generator().manual_seed(0)
    s = (torch.randint(0, 2, (4, 37), generator=g) * 2 - 1).to(dtype) * 1e4
    t = (torch.randint(0, 2, (4, 37), generator=g) * 2 - 1).to(dtype) * 1e4
    t = t + logits((4, 37), dtype, seed=5)
    with cpu_capability(capability):
        if not (divergence == "renyi" and params["alpha"] > 1):
            assert_matches_oracle(s, t, "cpu", divergence=divergence, **params)
            return
        loss, grad = loss_and_grad(s, t, backend="cpu", divergence=divergence, **params)
    ref_loss, ref_grad = oracle(s, t, divergence=divergence, **params)
    _, ref32_grad = oracle(s, t, dtype=torch.float32, divergence=divergence, **params)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    ref32_error = float((ref32_grad - ref_grad).abs().max())
    storage_rounding = float(ref_grad.abs().max()) * (2**-8 if dtype == torch.bfloat16 else 0.0)
    assert float((grad.double() - ref_grad).abs().max()) <= 2 * ref32_error + storage_rounding + 1e-7


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@div_params
def test_no_valid_row_gives_zero_not_nan(reduction, divergence, params):
    s, t = logits((3, 10), seed=1), logits((3, 10), seed=2)
    t[1] = float("-inf")  # garbage in an ignored row must not matter
    labels = torch.full((3,), -100)
    loss, grad = loss_and_grad(s, t, divergence=divergence, labels=labels, hard_weight=1.0, reduction=reduction,
                               backend="cpu", **params)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad, torch.zeros_like(grad))


def test_empty_batch():
    s, t = torch.zeros(0, 10), torch.zeros(0, 10)
    for reduction in ("batchmean", "sum"):
        assert float(kdfast.distill_loss(s, t, backend="cpu", reduction=reduction)) == 0.0


@caps
@pytest.mark.parametrize("layout", ["transposed", "strided", "sliced_rows", "3d"])
def test_non_contiguous_and_3d_inputs(layout, capability):
    base_s, base_t = logits((6, 2, 70), seed=1), logits((6, 2, 70), seed=2)
    if layout == "transposed":
        s, t = base_s[:, 0, :].t().contiguous().t(), base_t[:, 0, :].t().contiguous().t()
    elif layout == "strided":
        s, t = base_s[:, 0, ::2], base_t[:, 1, ::2]
    elif layout == "sliced_rows":
        s, t = base_s[::2, 1], base_t[1::2, 0]
    else:
        s, t = base_s, base_t
    assert layout == "3d" or not s.is_contiguous()
    labels = torch.arange(s.numel() // s.shape[-1]).reshape(s.shape[:-1]) % s.shape[-1]
    with cpu_capability(capability):
        assert_matches_oracle(s, t, "cpu", divergence="jsd", labels=labels, hard_weight=0.5, temperature=2.0)
        assert_matches_oracle(s, t, "cpu", divergence="kl", labels=labels, hard_weight=0.5, reduction="none")


def test_gradient_keeps_the_input_shape():
    s = logits((2, 3, 11)).requires_grad_()
    kdfast.distill_loss(s, logits((2, 3, 11), seed=1), backend="cpu").backward()
    assert s.grad.shape == (2, 3, 11)


def test_expanded_rows_beyond_2_31_elements():
    """N * V > 2^31 through stride-0 rows: nothing is materialised, every row is the same row."""
    V = 1 << 16
    N = (1 << 31) // V + 3
    row_s, row_t = logits((1, V), seed=1), logits((1, V), seed=2)
    s, t = row_s.expand(N, V), row_t.expand(N, V)
    assert s.numel() > 2**31
    per_row = kdfast.distill_loss(s, t, backend="cpu", reduction="none", temperature=2.0)
    one = kdfast.distill_loss(row_s, row_t, backend="cpu", reduction="none", temperature=2.0)
    assert per_row.shape == (N,)
    assert torch.equal(per_row, one.expand(N))


@pytest.mark.skipif(_C is None, reason="the C++ extension is not built")
def test_kernel_row_offsets_are_64_bit():
    """A row whose element offset exceeds 2^31 (pointer-shift probe, no 8 GB buffer)."""
    assert _C._check_large_row_offsets() == ""
