"""The edge cases of docs/contract.md, fused backends against the oracle."""

import pytest
import torch

import kdfast
from kdfast.registry import divergence_cases
from kdfast.ops.extension import _C
from conftest import (KERNELS, TRITON_ON_GPU, assert_matches_oracle, kernel_backend, kernel_device, kernels,
                      logits, loss_and_grad, oracle)

DIVS = divergence_cases(all_cases=False)
div_params = pytest.mark.parametrize("divergence,params", DIVS, ids=str)


@kernels
@div_params
@pytest.mark.parametrize("V", [1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 1024, 1025])
def test_vocab_sizes_around_vector_widths(V, divergence, params, kernel):
    s, t = logits((3, V), seed=V), logits((3, V), seed=V + 100)
    assert_matches_oracle(s, t, kernel, divergence=divergence, temperature=1.5, **params)


@kernels
@div_params
def test_masked_vocabulary_entries(divergence, params, kernel):
    """-inf logits shared by teacher and student (padded vocabulary) contribute exactly 0."""
    s, t = logits((4, 45), seed=1), logits((4, 45), seed=2)
    s[:, 40:44] = t[:, 40:44] = float("-inf")
    s[1, :44] = t[1, :44] = float("-inf")  # a row with a single live entry
    s[2, ::3] = t[2, ::3] = float("-inf")
    assert_matches_oracle(s, t, kernel, divergence=divergence, temperature=2.0, labels=torch.tensor([0, 44, 1, 5]),
                          hard_weight=0.3, **params)


@kernels
@pytest.mark.parametrize("student_temperature", [0.5, 2.0, 4.0, 64.0])
@pytest.mark.parametrize("offset", [0.0, 1e3, 3e5])
def test_hard_label_term_at_a_student_temperature_other_than_1(offset, student_temperature, kernel):
    """With tau_s != 1 the CE's softmax (temperature 1) is 2^(tau_s t) of the exponential sweep's t:
    the shift's rounding then counts tau_s times (3e5-size logits at tau_s = 64), which the kernel
    must take out of the CE's normaliser, or shift exactly."""
    s = logits((6, 45), seed=13) + offset
    t = logits((6, 45), seed=14) + offset
    labels = torch.tensor([0, 44, 7, 7, 20, 3])
    kw = dict(labels=labels, hard_weight=0.6, temperature=2.0, student_temperature=student_temperature,
              reduction="none")
    if offset >= 1e5 and s.dtype == torch.float32:
        # z / tau_s of 3e5-size float32 logits is itself rounded by ~1e-2 (ulp 0.03 / tau_s): compare with
        # the float32 reference's own error, as assert_matches_oracle does for ill-conditioned cases
        loss, grad = loss_and_grad(s, t, backend=kernel, **kw)
        ref64, grad64 = oracle(s, t, **kw)
        ref32, grad32 = oracle(s, t, dtype=torch.float32, **kw)
        assert (loss.double() - ref64).abs().max() <= 4 * (ref32 - ref64).abs().max() + 1e-5
        assert (grad.double() - grad64).abs().max() <= 4 * (grad32 - grad64).abs().max() + 1e-6
    else:
        assert_matches_oracle(s, t, kernel, **kw)


@kernels
def test_hard_label_term_of_huge_logits_whose_label_is_the_argmax(kernel):
    """The cross-entropy of a confident student (1e-5 at logits of 1e4) is not swamped by the rounding
    of the kernels' base-2 shift of the row (1e-3 at that scale): the CE is taken in natural units.
    At tau = 1 only: z / tau of 1e4-size logits is itself rounded by 1e-4 in float32."""
    s = logits((3, 37), seed=11) + 1e4
    labels = s.argmax(-1)
    s[torch.arange(3), labels] += 12.0
    t = logits((3, 37), seed=12) + 1e4
    assert_matches_oracle(s, t, kernel, labels=labels, hard_weight=1.0, soft_weight=1e-3)


@kernels
@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0, 4.0])
def test_wttm_weight_of_huge_logits(temperature, kernel):
    """The WTTM weight reads the teacher's log-normaliser at tau in natural units: the CPU kernel's
    base-2 shift of a row of 1e5-size logits is off by up to half an ulp of 1.4e5 (4e-3), which
    the weight must not inherit (it did: 0.3 % of the weight)."""
    s = logits((3, 37), seed=13) + 1e5
    t = logits((3, 37), seed=14) * 2 + 1e5
    assert_matches_oracle(s, t, kernel, weighting="wttm", temperature=temperature, student_temperature=1.0)


@kernels
@pytest.mark.parametrize("weighting", ["wttm", "entropy"])
def test_weights_where_the_shift_rounding_times_tau_is_large(weighting, kernel):
    """Logits of 1e9 at tau = 1e4: the one-FMA shift's rounding (up to 4e-3 of t) times tau would
    reach 2^(tau t) = 2^40; such rows take the exact shift, and the weights stay those of the oracle."""
    g = torch.Generator().manual_seed(3)
    s = 1e9 + 64.0 * torch.randint(-8, 8, (3, 37), generator=g).float()
    t = 1e9 + 64.0 * torch.randint(-8, 8, (3, 37), generator=g).float()
    assert_matches_oracle(s, t, kernel, weighting=weighting, temperature=1e4, student_temperature=1.0)


@kernels
@pytest.mark.parametrize("divergence", ["kl", "jsd", "tvd", "skew_kl"])
def test_teacher_only_masked_entries(divergence, kernel):
    """A teacher entry of -inf (p = 0) where the student has mass is finite for these divergences."""
    s, t = logits((3, 20), seed=1), logits((3, 20), seed=2)
    t[:, 3] = float("-inf")
    assert_matches_oracle(s, t, kernel, divergence=divergence)


@kernels
@div_params
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_huge_logits(divergence, params, dtype, kernel):
    """Logits of +-1e4.  Renyi with alpha > 1 is ill-conditioned there in float32
    (its gradient is exp(x - LSE) with x ~ 2e4, so float32 rounding of x alone is
    ~1e-3): there the gradient must be as close to the float64 oracle as the
    float32 reference itself is (within a factor 2), and the value within 1e-5."""
    g = torch.Generator().manual_seed(0)
    s = (torch.randint(0, 2, (4, 37), generator=g) * 2 - 1).to(dtype) * 1e4
    t = (torch.randint(0, 2, (4, 37), generator=g) * 2 - 1).to(dtype) * 1e4
    t = t + logits((4, 37), dtype, seed=5)
    if not (divergence == "renyi" and params["alpha"] > 1):
        assert_matches_oracle(s, t, kernel, divergence=divergence, **params)
        return
    loss, grad = loss_and_grad(s, t, backend=kernel, divergence=divergence, **params)
    ref_loss, ref_grad = oracle(s, t, divergence=divergence, **params)
    _, ref32_grad = oracle(s, t, dtype=torch.float32, divergence=divergence, **params)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    ref32_error = float((ref32_grad - ref_grad).abs().max())
    storage_rounding = float(ref_grad.abs().max()) * (2**-8 if dtype == torch.bfloat16 else 0.0)
    assert float((grad.double() - ref_grad).abs().max()) <= 2 * ref32_error + storage_rounding + 1e-7


@kernels
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@div_params
def test_no_valid_row_gives_zero_not_nan(reduction, divergence, params, kernel):
    s, t = logits((3, 10), seed=1), logits((3, 10), seed=2)
    t[1] = float("-inf")  # garbage in an ignored row must not matter
    labels = torch.full((3,), -100)
    loss, grad = loss_and_grad(s, t, divergence=divergence, labels=labels, hard_weight=1.0, reduction=reduction,
                               backend=kernel, **params)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad, torch.zeros_like(grad))


@kernels
def test_empty_batch(kernel):
    device = kernel_device(kernel)
    s, t = torch.zeros(0, 10, device=device), torch.zeros(0, 10, device=device)
    with kernel_backend(kernel) as backend:
        for reduction in ("batchmean", "sum"):
            assert float(kdfast.distill_loss(s, t, backend=backend, reduction=reduction)) == 0.0
        assert kdfast.distill_loss(s, t, backend=backend, reduction="none").shape == (0,)


@kernels
@pytest.mark.parametrize("layout", ["transposed", "strided", "sliced_rows", "3d"])
def test_non_contiguous_and_3d_inputs(layout, kernel):
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
    assert_matches_oracle(s, t, kernel, divergence="jsd", labels=labels, hard_weight=0.5, temperature=2.0)
    assert_matches_oracle(s, t, kernel, divergence="kl", labels=labels, hard_weight=0.5, reduction="none")


@kernels
def test_gradient_keeps_the_input_shape(kernel):
    _, grad = loss_and_grad(logits((2, 3, 11)), logits((2, 3, 11), seed=1), backend=kernel)
    assert grad.shape == (2, 3, 11)


@pytest.mark.parametrize("kernel", [k for k in KERNELS if k.startswith("cpu-")][-1:] + [
    pytest.param("triton", marks=pytest.mark.skipif(
        not TRITON_ON_GPU, reason="the Triton interpreter would run 32771 rows of 65536 entries in Python (hours); "
                                  "this runs on a GPU, and test_triton checks the compiled row offsets are 64-bit"))])
def test_expanded_rows_beyond_2_31_elements(kernel):
    """N * V > 2^31 through stride-0 rows: nothing is materialised, every row is the same row."""
    V = 1 << 16
    N = (1 << 31) // V + 3
    device = kernel_device(kernel)
    row_s, row_t = logits((1, V), seed=1).to(device), logits((1, V), seed=2).to(device)
    s, t = row_s.expand(N, V), row_t.expand(N, V)
    assert s.numel() > 2**31
    with kernel_backend(kernel) as backend:
        per_row = kdfast.distill_loss(s, t, backend=backend, reduction="none", temperature=2.0)
        one = kdfast.distill_loss(row_s, row_t, backend=backend, reduction="none", temperature=2.0)
    assert per_row.shape == (N,)
    assert torch.equal(per_row, one.expand(N))


@pytest.mark.skipif(_C is None, reason="the C++ extension is not built")
def test_kernel_row_offsets_are_64_bit():
    """A row whose element offset exceeds 2^31 (pointer-shift probe, no 8 GB buffer)."""
    assert _C._check_large_row_offsets() == ""


def _per_row_loss(op, s, t):
    """Per-row losses of one of the fused ops whose kernels stream a large gradient, on the C++ backend."""
    if op == "distill":
        return kdfast.distill_loss(s, t, temperature=2.0, reduction="none", backend="cpu")
    if op == "topk":
        logprobs, indices = torch.log_softmax(t.float(), dim=-1).topk(16, dim=-1)
        return kdfast.topk_distill_loss(s, indices, logprobs, tail="bucket", temperature=2.0, reduction="none",
                                        backend="cpu")
    if op == "ltkd":
        groups = torch.arange(s.shape[1]) % 3
        return kdfast.ltkd_loss(s, t, groups, rebalance=False, reduction="none", backend="cpu")
    labels = t.float().argmin(dim=-1)  # a row's label from its own logits: the parts have the same rows' labels
    return kdfast.grouped_kd_loss(s, t, labels, reduction="none", backend="cpu")


# rows all aligned; rows aligned one in 16 (a head of up to 15 entries); rows of 1000 entries (whole lines
# and a line shared with each neighbour); rows of 300 (streamed in float32, too short in bfloat16)
@pytest.mark.parametrize("vocab", [32768, 32769, 1000, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["distill", "topk", "ltkd", "grouped_kd"])
@pytest.mark.parametrize("capability", [k[len("cpu-"):] for k in KERNELS if k.startswith("cpu-")])
def test_gradients_larger_than_the_caches_are_streamed_to_the_same_bits(capability, op, dtype, vocab):
    """A gradient of at least ``_C.gradient_streaming_thresholds()`` bytes, of rows at least that
    long, is written with non-temporal stores (the full vectors of each row's whole cache lines; the
    head before the first aligned entry, the lines shared with the neighbouring rows and the tail
    store normally).  Rows are independent, so the rows of one such call must be bit-identical to
    the same rows computed in calls small enough to be stored normally."""
    if op == "topk" and vocab < 1000:
        pytest.skip("the bucket tail's top-16 support is most of a short row")
    from conftest import cpu_capability

    min_bytes, min_row_bytes = _C.gradient_streaming_thresholds()
    rows = min_bytes // (vocab * dtype.itemsize) + 8
    parts = 4
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(rows, vocab, generator=g) * 3).to(dtype)
    t = (torch.randn(rows, vocab, generator=g) * 3).to(dtype)

    def loss_and_grad(s_rows, t_rows):
        leaf = s_rows.clone().requires_grad_()
        loss = _per_row_loss(op, leaf, t_rows)
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
        return loss.detach(), grad

    with cpu_capability(capability):
        big_loss, big_grad = loss_and_grad(s, t)
        assert big_grad.untyped_storage().nbytes() >= min_bytes
        bounds = [rows * k // parts for k in range(parts + 1)]
        for part in (slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])):
            loss, grad = loss_and_grad(s[part], t[part])
            assert grad.untyped_storage().nbytes() < min_bytes
            assert torch.equal(loss, big_loss[part]) and torch.equal(grad, big_grad[part])


@kernels
@pytest.mark.parametrize("h", [1e-5, 1e-7, 1e-12, -1e-7])
def test_renyi_next_to_alpha_1_is_its_kl_limit(h, kernel):
    """Within RENYI_KL_WINDOW of 1 the direct formula would cancel (8 % off at 1 + 1e-7 in float32)."""
    s, t = logits((4, 50), seed=1), logits((4, 50), seed=2)
    loss, grad = loss_and_grad(s, t, backend=kernel, divergence="renyi", alpha=1 + h)
    kl_loss, kl_grad = oracle(s, t, divergence="kl")
    torch.testing.assert_close(loss.double(), kl_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), kl_grad, rtol=1e-4, atol=1e-6)
