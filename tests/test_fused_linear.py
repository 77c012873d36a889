"""The fused linear + distillation losses (kdfast.llm.fused_linear).

The oracle of every test is the materialised computation: the logits
``hidden @ weight.T + bias`` built in full by PyTorch, then ``kdfast.distill_loss``
(or ``topk_distill_loss``) with the same options and backend; values and the
gradients of the student's hidden states, weight and bias must agree.
float64: to 1e-10 relative; float32: to 1e-5 relative (the chunked matmuls and
the chunk-by-chunk sums round differently from the one-shot ones).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kdfast
from kdfast.registry import divergence_cases
from kdfast.llm.chunking import (CPU_CHUNK_BUDGET_BYTES, WEIGHT_SIZED_BUDGET_MIN_BYTES, default_chunk_size,
                                weight_sized_budget_bytes)
from kdfast.llm.fused_linear import (
    FusedLinearDistillLoss,
    FusedLinearTopKDistillLoss,
    fused_linear_distill_loss,
    fused_linear_topk_distill_loss,
)

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}
N, H_S, H_T, V = 37, 8, 12, 50  # 37 rows: no chunk size used below divides it


# ----------------------------------------------------------------- helpers
def make_heads(rows=(N,), *, dtype=torch.float64, bias=True, vocab=V, teacher_vocab=None, seed=0,
               teacher_grad=False):
    """Random student and teacher heads; the student's tensors require grad."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, grad=False):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(grad)

    teacher_vocab = teacher_vocab or vocab
    return dict(
        student_hidden=randn(*rows, H_S, grad=True),
        student_weight=randn(vocab, H_S, scale=0.5, grad=True),
        student_bias=randn(vocab, scale=0.3, grad=True) if bias else None,
        teacher_hidden=randn(*rows, H_T, grad=teacher_grad),
        teacher_weight=randn(teacher_vocab, H_T, scale=0.5, grad=teacher_grad),
        teacher_bias=randn(teacher_vocab, scale=0.3, grad=teacher_grad) if bias else None,
    )


def make_labels(rows=(N,), vocab=V, seed=1, ignore_every=4):
    labels = torch.randint(0, vocab, rows, generator=torch.Generator().manual_seed(seed))
    labels.view(-1)[::ignore_every] = -100
    return labels


def logits(hidden, weight, bias, softcap=None):
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def materialised_loss(heads, labels=None, *, softcap=None, shift=False, vocab_policy="error", **options):
    """The oracle: full logits of both heads, then kdfast.distill_loss (the fused-only options are dropped)."""
    for fused_only in ("chunk_size", "accumulate_fp32", "process_group"):
        options.pop(fused_only, None)
    s_hidden, t_hidden = heads["student_hidden"], heads["teacher_hidden"]
    t_weight, t_bias = heads["teacher_weight"], heads["teacher_bias"]
    if vocab_policy == "truncate":
        V_s = heads["student_weight"].shape[0]
        t_weight, t_bias = t_weight[:V_s], None if t_bias is None else t_bias[:V_s]
    if shift:
        s_hidden, t_hidden = s_hidden[:, :-1], t_hidden[:, :-1]
        labels = None if labels is None else labels[:, 1:]
    zs = logits(s_hidden, heads["student_weight"], heads["student_bias"], softcap)
    with torch.no_grad():
        zt = logits(t_hidden, t_weight, t_bias, softcap)
    zs, zt = zs.reshape(-1, zs.shape[-1]), zt.reshape(-1, zt.shape[-1])
    return kdfast.distill_loss(zs, zt, labels=None if labels is None else labels.reshape(-1), **options)


def fused_loss(heads, labels=None, **options):
    return fused_linear_distill_loss(heads["student_hidden"], heads["student_weight"], heads["teacher_hidden"],
                                     heads["teacher_weight"], labels, student_bias=heads["student_bias"],
                                     teacher_bias=heads["teacher_bias"], **options)


def student_grads(loss, heads, seed_grad=None):
    params = [heads[k] for k in ("student_hidden", "student_weight", "student_bias") if heads[k] is not None]
    return torch.autograd.grad(loss, params, seed_grad)


def assert_close(actual, expected, dtype=torch.float64, scale_atol=True):
    """Values to the dtype's tolerance; gradients' atol relative to their largest entry."""
    tol = dict(TOL[dtype])
    if scale_atol:
        tol["atol"] = tol["atol"] + tol["rtol"] * float(expected.abs().max())
    torch.testing.assert_close(actual, expected, **tol)


def assert_matches_materialised(heads, labels=None, *, dtype=torch.float64, **options):
    """Value and every student gradient of the fused loss equal the materialised oracle's."""
    loss = fused_loss(heads, labels, **options)
    expected = materialised_loss(heads, labels, **options)
    seed_grad = torch.linspace(-1.0, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape) if loss.dim() else None
    assert loss.dtype == expected.dtype and loss.shape == expected.shape
    assert_close(loss, expected, dtype, scale_atol=False)
    for got, want in zip(student_grads(loss, heads, seed_grad), student_grads(expected, heads, seed_grad)):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert_close(got, want, dtype)


# ----------------------------------------------------------------- equality with the materialised loss
# every divergence of the registry, some at other temperatures
_TEMPERATURES = {"kl": dict(temperature=2.0), "jsd": dict(temperature=1.5), "skew_reverse_kl": dict(student_temperature=3.0)}
DIVERGENCE_CASES = [dict(divergence=d, **params, **_TEMPERATURES.get(d, {}))
                    for d, params in divergence_cases(all_cases=False)]


@pytest.mark.parametrize("options", DIVERGENCE_CASES, ids=lambda o: o["divergence"])
def test_every_divergence_matches_materialised_float64(options):
    assert_matches_materialised(make_heads(), make_labels(), hard_weight=0.4, chunk_size=7, **options)


@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_float32_matches_materialised_to_1e5(divergence):
    heads = make_heads(dtype=torch.float32)
    assert_matches_materialised(heads, make_labels(), dtype=torch.float32, divergence=divergence, temperature=2.0,
                                chunk_size=10)


@pytest.mark.parametrize("weighting", ["entropy", "wttm", "tensor"])
def test_weightings_work_chunk_by_chunk(weighting):
    if weighting == "tensor":
        weighting = torch.rand(N, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert_matches_materialised(make_heads(), make_labels(), weighting=weighting, temperature=2.0, chunk_size=6)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_reductions_match_with_a_non_unit_incoming_gradient(reduction):
    # the oracle helper seeds "none" with a per-row gradient (linspace), which
    # the fused backward must apply row by row.
    assert_matches_materialised(make_heads(), make_labels(), reduction=reduction, hard_weight=0.5, chunk_size=8)


@pytest.mark.parametrize("chunk_size", [1, 7, N, 1000, None])
def test_any_chunk_size_gives_the_same_result(chunk_size):
    assert_matches_materialised(make_heads(), make_labels(), divergence="jsd", chunk_size=chunk_size)


def test_without_labels_and_without_biases():
    assert_matches_materialised(make_heads(bias=False), None, temperature=3.0, chunk_size=9)


def test_softcap_caps_both_models_with_the_chain_rule():
    heads = make_heads()
    with torch.no_grad():  # big logits, so that the cap bends them
        heads["student_weight"].mul_(8.0)
        heads["teacher_weight"].mul_(8.0)
    assert_matches_materialised(heads, make_labels(), softcap=5.0, hard_weight=0.3, chunk_size=8)


def test_softcap_changes_the_loss():
    heads = make_heads()
    with torch.no_grad():
        heads["student_weight"].mul_(8.0)
    capped = fused_loss(heads, softcap=2.0, chunk_size=8)
    assert not torch.allclose(capped, fused_loss(heads, chunk_size=8))


def test_shift_predicts_the_next_token():
    rows = (3, 9)
    heads = make_heads(rows)
    labels = make_labels(rows)
    assert_matches_materialised(heads, labels, shift=True, hard_weight=0.5, chunk_size=5)
    assert_matches_materialised(heads, labels, shift=True, reduction="none", chunk_size=5)


def test_shift_gives_the_last_position_no_gradient():
    heads = make_heads((2, 6))
    loss = fused_loss(heads, make_labels((2, 6)), shift=True, chunk_size=4)
    (grad_hidden, *_) = student_grads(loss, heads)
    assert torch.all(grad_hidden[:, -1] == 0) and grad_hidden[:, :-1].abs().sum() > 0


def test_batched_3d_inputs_without_shift():
    rows = (4, 5)
    assert_matches_materialised(make_heads(rows), make_labels(rows), divergence="reverse_kl", chunk_size=6)


def test_bf16_weights_accumulate_in_fp32():
    """bf16 heads: the value to 1e-3 relative, gradients to 1.5% of their largest entry.

    Both sides round the logits and the logits' gradient to bf16 (8 significant
    bits), and the chunked matmuls differ in summation order; 2^-7 of the
    largest entry is about the spacing of bf16 there, doubled for headroom.
    """
    heads = make_heads(dtype=torch.bfloat16, seed=5)
    labels = make_labels()
    loss = fused_loss(heads, labels, temperature=2.0, chunk_size=8)
    expected = materialised_loss(heads, labels, temperature=2.0)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-4)
    for got, want in zip(student_grads(loss, heads), student_grads(expected, heads)):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2 * 2**-7 * float(want.abs().max()))


def test_fp32_accumulation_is_more_accurate_than_bf16_accumulation():
    """With one row per chunk, a bf16 accumulator rounds N times; the fp32 one once."""
    heads = make_heads((64,), dtype=torch.bfloat16, seed=6)
    exact_heads = {k: None if v is None else v.detach().double().requires_grad_(v.requires_grad)
                   for k, v in heads.items()}
    exact_weight_grad = student_grads(fused_loss(exact_heads, chunk_size=64), exact_heads)[1]
    errors = {}
    for fp32 in (True, False):
        loss = fused_loss(heads, chunk_size=1, accumulate_fp32=fp32)
        weight_grad = student_grads(loss, heads)[1]
        errors[fp32] = float((weight_grad.double() - exact_weight_grad).norm())
    assert errors[True] < 0.5 * errors[False]


def test_hidden_sizes_may_differ_and_vocab_truncate_restricts_the_teacher():
    heads = make_heads(teacher_vocab=V + 14)
    assert_matches_materialised(heads, make_labels(), vocab_policy="truncate", chunk_size=8, hard_weight=0.2)


def test_vocab_error_names_both_sizes():
    heads = make_heads(teacher_vocab=V + 14)
    with pytest.raises(ValueError, match=rf"V_t={V + 14}.*V_s={V}"):
        fused_loss(heads)


def test_vocab_truncate_needs_a_larger_teacher():
    with pytest.raises(ValueError, match="at least as large"):
        fused_loss(make_heads(teacher_vocab=V - 5), vocab_policy="truncate")
    with pytest.raises(ValueError, match="vocab_policy"):
        fused_loss(make_heads(), vocab_policy="pad")


def test_gradient_accumulation_with_a_global_normalizer_equals_one_batch():
    heads = make_heads((40,))
    labels = make_labels((40,))
    whole = student_grads(fused_loss(heads, labels, chunk_size=16), heads)
    total_valid = int((labels != -100).sum())
    halves = [slice(0, 23), slice(23, 40)]
    accumulated = None
    for rows in halves:
        part = dict(heads, student_hidden=heads["student_hidden"][rows], teacher_hidden=heads["teacher_hidden"][rows])
        loss = fused_linear_distill_loss(part["student_hidden"], part["student_weight"], part["teacher_hidden"],
                                         part["teacher_weight"], labels[rows], student_bias=part["student_bias"],
                                         teacher_bias=part["teacher_bias"], normalizer=total_valid, chunk_size=16)
        grads = student_grads(loss, heads)
        accumulated = grads if accumulated is None else tuple(a + g for a, g in zip(accumulated, grads))
    for got, want in zip(accumulated, whole):
        assert_close(got, want)


def test_the_teacher_gets_no_gradient():
    heads = make_heads(teacher_grad=True)
    fused_loss(heads, make_labels(), chunk_size=8).backward()
    assert all(heads[k].grad is None for k in ("teacher_hidden", "teacher_weight", "teacher_bias"))
    assert all(heads[k].grad is not None for k in ("student_hidden", "student_weight", "student_bias"))


def test_only_the_inputs_that_require_grad_get_one():
    heads = make_heads()
    heads["student_hidden"] = heads["student_hidden"].detach()
    heads["student_bias"] = heads["student_bias"].detach()
    loss = fused_loss(heads, chunk_size=8)
    assert loss.grad_fn.saved_tensors[0] is None and loss.grad_fn.saved_tensors[2] is None
    (weight_grad,) = torch.autograd.grad(loss, heads["student_weight"])
    (expected,) = torch.autograd.grad(materialised_loss(heads), heads["student_weight"])
    assert_close(weight_grad, expected)


class _MatmulCounter(TorchDispatchMode):
    """Counts the matrix products an operation runs."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_under_no_grad_only_the_value_is_computed():
    heads = make_heads()
    with torch.no_grad(), _MatmulCounter() as products:
        loss = fused_loss(heads, make_labels(), chunk_size=8)
    assert loss.grad_fn is None
    assert products.count == 2 * 5  # the logits of both models in each of the 5 chunks, no gradient products
    assert_close(loss, materialised_loss(heads, make_labels()).detach(), scale_atol=False)


def test_backward_scales_by_the_incoming_gradient():
    heads = make_heads()
    once = student_grads(fused_loss(heads, chunk_size=8), heads)
    tripled = student_grads(3.0 * fused_loss(heads, chunk_size=8), heads)
    for a, b in zip(tripled, once):
        assert_close(a, 3.0 * b)


def test_no_valid_row_gives_zero_and_zero_gradients():
    heads = make_heads()
    labels = torch.full((N,), -100)
    loss = fused_loss(heads, labels, hard_weight=1.0, chunk_size=8)
    assert float(loss.detach()) == 0.0
    assert all(torch.all(g == 0) for g in student_grads(loss, heads))


def test_zero_rows():
    heads = make_heads((0,))
    loss = fused_loss(heads)
    assert float(loss.detach()) == 0.0
    grads = student_grads(loss, heads)
    assert grads[0].shape == (0, H_S) and torch.all(grads[1] == 0)


# ----------------------------------------------------------------- memory: no (N, V) tensor
class _OutputStorages(TorchDispatchMode):
    """Records the storage size (bytes) of every tensor that an operator returns.

    Storage, not shape: a zero-stride ``expand`` of one element is a large
    shape with no memory behind it.
    """

    def __init__(self):
        super().__init__()
        self.nbytes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.nbytes.append(t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_no_operator_produces_an_n_by_v_tensor(reduction):
    rows, chunk = 64, 8
    heads = make_heads((rows,), dtype=torch.float32)
    with _OutputStorages() as seen:
        loss = fused_loss(heads, make_labels((rows,)), chunk_size=chunk, reduction=reduction, hard_weight=0.5)
        student_grads(loss, heads, torch.ones_like(loss) if loss.dim() else None)
    chunk_logits = chunk * V * 4
    assert chunk_logits in seen.nbytes, "the recorder saw no chunk of logits"
    # Besides views of the inputs, the largest buffers are the (chunk, V)
    # logits and gradients and the (V, H_s) weight gradient; a (rows, V)
    # tensor would be 4x larger than any of them.
    largest_input = max(t.untyped_storage().nbytes() for t in heads.values())
    assert max(seen.nbytes) <= max(chunk_logits, V * H_S * 4, largest_input) < rows * V * 4 // 4


def test_only_the_gradients_are_saved_for_backward():
    heads = make_heads((64,), dtype=torch.float32)
    loss = fused_loss(heads, chunk_size=8)
    saved = [tuple(t.shape) for t in loss.grad_fn.saved_tensors]
    assert saved == [(64, H_S), (V, H_S), (V,)]


def test_default_chunk_size_fits_the_budget():
    bytes_per_row = 49152 * 12  # fp32 student logits + gradient + teacher logits
    size = default_chunk_size(4096, bytes_per_row, torch.device("cpu"))
    assert size % 16 == 0 and size * bytes_per_row <= CPU_CHUNK_BUDGET_BYTES < (size + 16) * bytes_per_row
    assert default_chunk_size(5, bytes_per_row, torch.device("cpu")) == 5
    assert default_chunk_size(100, 10 * CPU_CHUNK_BUDGET_BYTES, torch.device("cpu")) == 1
    assert default_chunk_size(4096, 1024, torch.device("cpu"), budget_bytes=1024 * 100) == 96


def test_the_top_k_loop_sizes_its_one_buffer_like_the_weight():
    """One (chunk, V) buffer and no teacher head: the budget is the weight's bytes, within [64 MiB, 256 MiB]."""
    weight = torch.empty(49152, 576)  # SmolLM2's head: 113 MB -> 576 rows of float32 logits
    assert weight_sized_budget_bytes(weight) == 49152 * 576 * 4
    assert default_chunk_size(4096, 49152 * 4, weight.device, weight_sized_budget_bytes(weight)) == 576
    assert weight_sized_budget_bytes(torch.empty(1000, 64)) == WEIGHT_SIZED_BUDGET_MIN_BYTES
    assert weight_sized_budget_bytes(torch.empty(128256, 4096)) == CPU_CHUNK_BUDGET_BYTES



def test_the_in_place_top_k_loop_uses_the_weight_sized_budget(monkeypatch):
    import kdfast.llm.chunking as chunking
    import kdfast.llm.fused_linear as fused_linear

    seen = []
    real = fused_linear.chunked_linear_loss

    def spy(head, plan):
        seen.append(plan.chunk_size)
        return real(head, plan)

    monkeypatch.setattr(fused_linear, "chunked_linear_loss", spy)
    monkeypatch.setattr(chunking, "WEIGHT_SIZED_BUDGET_MIN_BYTES", 16 * 30 * 4)  # 16 rows of 30 float32 logits
    hidden, weight = torch.randn(40, 8), torch.randn(30, 8)  # the weight's 960 bytes: below that floor
    lp, idx = torch.randn(40, 30).log_softmax(-1).topk(4)
    want = kdfast.fused_linear_topk_distill_loss(hidden, weight, idx, lp, chunk_size=40)
    got = kdfast.fused_linear_topk_distill_loss(hidden, weight, idx, lp)
    kdfast.fused_linear_topk_distill_loss(hidden, weight, idx, lp, backend="torch")
    assert seen == [40, 16, 40]  # the fixed budget fits every row; the in-place CPU loop takes 16 at a time
    torch.testing.assert_close(got, want)


# ----------------------------------------------------------------- the logits' matrix product
def test_onednn_and_torch_mm_chunk_logits_agree(monkeypatch):
    from kdfast.llm import chunking as _chunking, onednn as _onednn

    heads = make_heads((64,), dtype=torch.float32)
    if not _onednn.uses_onednn(heads["student_weight"]):
        pytest.skip("oneDNN's linear is not available in this torch build")
    labels = make_labels((64,))
    loss = fused_loss(heads, labels, chunk_size=24, hard_weight=0.3)
    grads = student_grads(loss, heads)
    monkeypatch.setattr(_chunking, "uses_onednn", lambda weight: False)
    mm_loss = fused_loss(heads, labels, chunk_size=24, hard_weight=0.3)
    assert_close(loss, mm_loss, torch.float32, scale_atol=False)
    for got, want in zip(grads, student_grads(mm_loss, heads)):
        assert_close(got, want, torch.float32)


def test_onednn_grad_rows_is_the_product_with_the_weight():
    from kdfast.llm import onednn as _onednn

    weight = torch.randn(37, 11)
    if not _onednn.uses_onednn(weight):
        pytest.skip("oneDNN's linear is not available in this torch build")
    grad = torch.randn(50, 37)[::2]  # rows of a strided view
    torch.testing.assert_close(_onednn.onednn_grad_rows(grad, weight), grad @ weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_only_float32_heads_use_onednn(dtype):
    from kdfast.llm.onednn import uses_onednn

    assert not uses_onednn(torch.zeros(4, 3, dtype=dtype))
    assert not uses_onednn(torch.zeros(3, 4).t())  # not contiguous: no per-chunk copy of the weight


def test_kdfast_onednn_0_turns_it_off(monkeypatch):
    from kdfast.llm.onednn import onednn_linear_works, uses_onednn

    monkeypatch.setenv("KDFAST_ONEDNN", "0")
    onednn_linear_works.cache_clear()
    try:
        assert not uses_onednn(torch.zeros(4, 3))
    finally:
        monkeypatch.delenv("KDFAST_ONEDNN")
        onednn_linear_works.cache_clear()


# ----------------------------------------------------------------- errors
def test_shape_and_type_errors_name_the_tensors():
    heads = make_heads()
    bad = dict(heads, student_weight=torch.randn(V, H_S + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"student_weight shape \(50, 9\)"):
        fused_loss(bad)
    bad = dict(heads, teacher_hidden=torch.randn(N + 1, H_T, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"teacher_hidden shape \(38, 12\).*\(37, 8\)"):
        fused_loss(bad)
    bad = dict(heads, student_bias=torch.randn(V + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="student_bias shape"):
        fused_loss(bad)
    bad = dict(heads, student_hidden=torch.randn(2, 3, 4, H_S, dtype=torch.float64))
    with pytest.raises(ValueError, match="student_hidden must be 2-D or 3-D"):
        fused_loss(bad)
    bad = dict(heads, student_weight=heads["student_weight"].float())
    with pytest.raises(TypeError, match="student_weight dtype torch.float32 does not match"):
        fused_loss(bad)
    with pytest.raises(TypeError, match="teacher_weight must be a torch.Tensor"):
        fused_loss(dict(heads, teacher_weight=[[1.0]]))


def test_label_errors():
    heads = make_heads()
    labels = make_labels()
    labels[30] = V + 3
    with pytest.raises(ValueError, match=f"label {V + 3} at row 30"):
        fused_loss(heads, labels, chunk_size=8)
    with pytest.raises(ValueError, match="labels shape"):
        fused_loss(heads, make_labels((N + 2,)))


def test_shift_errors():
    with pytest.raises(ValueError, match=r"shift=True needs batched sequences"):
        fused_loss(make_heads(), shift=True)
    rows = (3, 5)
    with pytest.raises(ValueError, match=r"labels shape \(3, 4\)"):
        fused_loss(make_heads(rows), make_labels((3, 4)), shift=True)


def test_option_errors():
    heads = make_heads()
    with pytest.raises(ValueError, match="divergence must be one of"):
        fused_loss(heads, divergence="wasserstein")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fused_loss(heads, temperature=0.0)
    with pytest.raises(ValueError, match="softcap must be > 0"):
        fused_loss(heads, softcap=-1.0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        fused_loss(heads, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be a positive int"):
        fused_loss(heads, chunk_size=2.5)
    with pytest.raises(ValueError, match="weighting shape"):
        fused_loss(heads, weighting=torch.ones(N + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="cannot be combined with process_group"):
        fused_loss(heads, backend="torch", process_group=object())


# ----------------------------------------------------------------- module form
def test_module_equals_the_function():
    heads = make_heads()
    labels = make_labels()
    module = FusedLinearDistillLoss(divergence="jsd", beta=0.4, temperature=2.0, chunk_size=9, hard_weight=0.2)
    got = module(heads["student_hidden"], heads["student_weight"], heads["teacher_hidden"], heads["teacher_weight"],
                 labels, student_bias=heads["student_bias"], teacher_bias=heads["teacher_bias"])
    want = fused_loss(heads, labels, divergence="jsd", beta=0.4, temperature=2.0, chunk_size=9, hard_weight=0.2)
    assert_close(got, want, scale_atol=False)
    assert "jsd" in repr(module)


def test_module_rejects_bad_options_at_construction():
    with pytest.raises(TypeError):
        FusedLinearDistillLoss(chunksize=8)
    with pytest.raises(TypeError, match="labels is passed at call time"):
        FusedLinearDistillLoss(labels=torch.zeros(3))
    with pytest.raises(ValueError, match="jsd needs beta"):
        FusedLinearDistillLoss(divergence="jsd", beta=2.0)


# ----------------------------------------------------------------- the sparse (top-k) teacher
def make_topk(rows=(N,), k=6, seed=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(*rows, V, generator=g, dtype=torch.float64) * 2.0
    logprobs, indices = torch.log_softmax(teacher, -1).topk(k, dim=-1)
    return indices, logprobs.to(dtype)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_topk_form_matches_materialised(tail, reduction):
    from kdfast.llm.topk import topk_distill_loss

    heads = make_heads()
    indices, logprobs = make_topk()
    labels = make_labels()
    options = dict(tail=tail, divergence="kl", temperature=2.0, hard_weight=0.3, reduction=reduction)
    loss = fused_linear_topk_distill_loss(heads["student_hidden"], heads["student_weight"], indices, logprobs, labels,
                                          student_bias=heads["student_bias"], chunk_size=7, **options)
    expected = topk_distill_loss(logits(heads["student_hidden"], heads["student_weight"], heads["student_bias"]),
                                 indices, logprobs, labels=labels, **options)
    seed_grad = torch.linspace(-1.0, 2.0, N, dtype=torch.float64) if reduction == "none" else None
    assert_close(loss, expected, scale_atol=False)
    for got, want in zip(student_grads(loss, heads, seed_grad), student_grads(expected, heads, seed_grad)):
        assert_close(got, want)


def test_topk_form_with_shift_and_module():
    from kdfast.llm.topk import topk_distill_loss

    rows = (3, 7)
    heads = make_heads(rows)
    indices, logprobs = make_topk(rows)
    labels = make_labels(rows)
    module = FusedLinearTopKDistillLoss(tail="bucket", shift=True, chunk_size=4, softcap=4.0)
    loss = module(heads["student_hidden"], heads["student_weight"], indices, logprobs, labels,
                  student_bias=heads["student_bias"])
    zs = logits(heads["student_hidden"][:, :-1], heads["student_weight"], heads["student_bias"], softcap=4.0)
    expected = topk_distill_loss(zs.reshape(-1, V), indices[:, :-1].reshape(-1, 6), logprobs[:, :-1].reshape(-1, 6),
                                 labels=labels[:, 1:].reshape(-1), tail="bucket")
    assert_close(loss, expected, scale_atol=False)
    for got, want in zip(student_grads(loss, heads), student_grads(expected, heads)):
        assert_close(got, want)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_topk_backends_tail_logprobs_and_chunks(backend, tail):
    from kdfast.llm.topk import log1mexp, topk_distill_loss

    if backend not in kdfast.available_backends():
        pytest.skip("the C++ extension is not built")
    heads = make_heads()
    indices, logprobs = make_topk()
    labels = make_labels()
    rest = log1mexp(torch.logsumexp(logprobs, -1)) - 0.05 if tail == "bucket" else None
    options = dict(tail=tail, divergence="jsd", beta=0.3, temperature=1.5, student_temperature=1.2, hard_weight=0.4,
                   tail_logprobs=rest)
    loss = fused_linear_topk_distill_loss(heads["student_hidden"], heads["student_weight"], indices, logprobs, labels,
                                          student_bias=heads["student_bias"], chunk_size=5, backend=backend, **options)
    expected = topk_distill_loss(logits(heads["student_hidden"], heads["student_weight"], heads["student_bias"]),
                                 indices, logprobs, labels=labels, backend="torch", **options)
    assert_close(loss, expected, scale_atol=False)
    for got, want in zip(student_grads(loss, heads), student_grads(expected, heads)):
        assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_cpu_chunks_write_their_gradient_over_the_logits(monkeypatch, dtype):
    """On CPU every chunk runs the in-place op (no per-chunk autograd), in the head's dtype."""
    import kdfast.llm.chunking as chunking
    from kdfast.llm.topk import topk_distill_loss

    if "cpu" not in kdfast.available_backends():
        pytest.skip("the C++ extension is not built")
    monkeypatch.setattr(chunking, "_loss_and_autograd_grad", None)  # any autograd chunk would fail
    heads = make_heads(dtype=dtype, bias=False)
    indices, logprobs = make_topk()
    loss = fused_linear_topk_distill_loss(heads["student_hidden"], heads["student_weight"], indices, logprobs,
                                          make_labels(), tail="bucket", chunk_size=6, hard_weight=0.5)
    grads = student_grads(loss, heads)
    zs = logits(heads["student_hidden"].double(), heads["student_weight"].double(), None).detach().requires_grad_()
    want = topk_distill_loss(zs, indices, logprobs, labels=make_labels(), tail="bucket", hard_weight=0.5,
                             backend="torch")
    (grad_logits,) = torch.autograd.grad(want, zs)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(loss.double(), want, **tol)
    torch.testing.assert_close(grads[0].double(), grad_logits @ heads["student_weight"].double(), **tol)


def test_topk_errors():
    heads = make_heads()
    indices, logprobs = make_topk()
    with pytest.raises(ValueError, match="tail must be one of"):
        fused_linear_topk_distill_loss(heads["student_hidden"], heads["student_weight"], indices, logprobs,
                                       tail="drop")
    with pytest.raises(ValueError, match="topk_indices shape"):
        fused_linear_topk_distill_loss(heads["student_hidden"], heads["student_weight"], indices[:-1], logprobs[:-1])
    with pytest.raises(ValueError, match="tail_logprobs is the teacher's bucket"):
        fused_linear_topk_distill_loss(heads["student_hidden"], heads["student_weight"], indices, logprobs,
                                       tail_logprobs=logprobs[:, 0])
    with pytest.raises(ValueError, match="tail_logprobs shape"):
        fused_linear_topk_distill_loss(heads["student_hidden"], heads["student_weight"], indices, logprobs,
                                       tail="bucket", tail_logprobs=logprobs[:-1, 0])
    bad = indices.clone()
    bad[3, 1] = bad[3, 0]
    with pytest.raises(ValueError, match="topk_indices row 3 repeats index"):
        fused_linear_topk_distill_loss(heads["student_hidden"], heads["student_weight"], bad, logprobs)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_topk_errors_name_the_row_of_the_whole_call_not_of_its_chunk(backend):
    heads = make_heads()
    indices, logprobs = make_topk()
    bad_indices, bad_logprobs = indices.clone(), logprobs.clone()
    bad_indices[30, 2] = V + 3
    bad_logprobs[33, 1] = 0.5
    for tail in ("renormalize", "bucket"):
        with pytest.raises(ValueError, match=rf"topk_indices value {V + 3} at row 30 is outside"):
            fused_linear_topk_distill_loss(heads["student_hidden"], heads["student_weight"], bad_indices, logprobs,
                                           tail=tail, chunk_size=8, backend=backend)
        with pytest.raises(ValueError, match="must be <= 0, row 33 has 0.5"):
            fused_linear_topk_distill_loss(heads["student_hidden"], heads["student_weight"], indices, bad_logprobs,
                                           tail=tail, chunk_size=8, backend=backend)


# ----------------------------------------------------------------- other backends and vocabulary-parallel heads
def test_reference_backend_matches_materialised():
    assert_matches_materialised(make_heads(), make_labels(), divergence="ab", backend="torch", chunk_size=11)


def test_triton_backend_through_the_interpreter():
    pytest.importorskip("triton", reason="the Triton backend needs triton")
    if "triton" not in kdfast.available_backends():
        pytest.skip("the Triton backend is not available here")
    if torch.cuda.is_available():
        pytest.skip("CPU tensors: interpreter only (tests/test_gpu_session.py runs fused linear on CUDA)")
    rows = (12,)
    heads = make_heads(rows, dtype=torch.float32, bias=False)
    assert_matches_materialised(heads, make_labels(rows), dtype=torch.float32, backend="triton", chunk_size=5,
                                hard_weight=0.5)


@pytest.fixture
def single_rank_group(tmp_path):
    dist = pytest.importorskip("torch.distributed", reason="vocabulary-parallel heads need torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_process_group_of_one_rank_equals_the_plain_loss(single_rank_group):
    heads = make_heads()
    labels = make_labels()
    # chunk_size=None: the ranks agree on the automatic chunk size through an all-reduce
    assert_matches_materialised(heads, labels, divergence="jsd", hard_weight=0.3, weighting="entropy",
                                chunk_size=None, process_group=single_rank_group)


def _vocab_parallel_rank(rank: int, store: str, shard_sizes: tuple, out_dir: str) -> None:
    """One rank of a 2-rank gloo group: the fused loss of its vocabulary shards of the heads."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        heads = make_heads()
        start = sum(shard_sizes[:rank])
        rows = slice(start, start + shard_sizes[rank])
        shard = {k: heads[k].detach()[rows].requires_grad_(heads[k].requires_grad)
                 for k in ("student_weight", "student_bias", "teacher_weight", "teacher_bias")}
        loss = fused_linear_distill_loss(heads["student_hidden"], shard["student_weight"], heads["teacher_hidden"],
                                         shard["teacher_weight"], make_labels(), student_bias=shard["student_bias"],
                                         teacher_bias=shard["teacher_bias"], divergence="jsd", hard_weight=0.3,
                                         chunk_size=8, process_group=dist.group.WORLD)
        grads = torch.autograd.grad(loss, (heads["student_hidden"], shard["student_weight"], shard["student_bias"]))
        torch.save((loss.detach(), grads), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_heads_on_two_ranks_equal_the_full_heads(tmp_path):
    """Unequal shards (20 + 30 entries): every rank gets the full loss and hidden gradient, and its weight rows."""
    dist = pytest.importorskip("torch.distributed", reason="vocabulary-parallel heads need torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    shard_sizes = (20, 30)
    torch.multiprocessing.spawn(_vocab_parallel_rank, args=(str(tmp_path / "store"), shard_sizes, str(tmp_path)),
                                nprocs=2, join=True)
    heads = make_heads()
    expected = materialised_loss(heads, make_labels(), divergence="jsd", hard_weight=0.3)
    hidden_grad, weight_grad, bias_grad = student_grads(expected, heads)
    for rank in range(2):
        loss, (got_hidden, got_weight, got_bias) = torch.load(tmp_path / f"rank{rank}.pt")
        rows = slice(sum(shard_sizes[:rank]), sum(shard_sizes[: rank + 1]))
        assert_close(loss, expected.detach(), scale_atol=False)
        assert_close(got_hidden, hidden_grad)
        assert_close(got_weight, weight_grad[rows])
        assert_close(got_bias, bias_grad[rows])


# ----------------------------------------------------------------- the benchmark script
def _load_benchmark():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_fused_linear.py"
    spec = importlib.util.spec_from_file_location("bench_fused_linear", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_fused_linear"] = module
    spec.loader.exec_module(module)
    return module


def test_benchmark_script_runs_and_writes_its_json(tmp_path, capsys):
    import json

    bench = _load_benchmark()
    out = tmp_path / "r.json"
    bench.main(["--shape", "64x16x24x256", "--methods", "eager", "kdfast", "--runs", "2", "--no-memory",
                "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["shape"] == dict(rows=64, hidden_student=16, hidden_teacher=24, vocab=256, dtype="float32")
    assert payload["machine"]["torch_threads"] >= 1
    assert [r["method"] for r in payload["records"]] == ["eager", "kdfast"]
    assert all(r["median_s"] > 0 and len(r["times_s"]) == 2 for r in payload["records"])
    # both methods compute the same loss and gradients
    assert max(payload["agreement"]["loss_grad_hidden_grad_weight"]["kdfast"]) < 1e-5
    assert "time_vs_eager" in payload["summary"] and "time_vs_eager" in capsys.readouterr().out


def test_benchmark_memory_probe_sees_the_logits():
    bench = _load_benchmark()
    shape = bench.Shape(256, 16, 16, 8192, "float32")  # 8 MiB of logits per model
    step = bench.make_method("eager", bench.make_inputs(shape, torch.device("cpu")))
    peak = bench.peak_memory_of(step, torch.device("cpu"))
    if peak is None:
        pytest.skip("this kernel does not let a process reset its peak resident memory")
    assert peak >= 2 * 256 * 8192 * 4  # at least the student's logits and their gradient
