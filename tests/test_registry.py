"""The loss-family registry is the one list: every backend and every derived list agree with it."""

import inspect
import math

import pytest
import torch

import kdfast
from kdfast import reference, registry
from kdfast.ops.extension import _C
from kdfast.config import resolve_divergence


def test_the_public_list_is_the_table():
    assert kdfast.DIVERGENCES == registry.DIVERGENCE_NAMES == tuple(s.name for s in registry.DIVERGENCE_TABLE)


@pytest.mark.skipif(_C is None, reason="the C++ extension is not built")
def test_the_cpp_x_macro_list_is_the_table_in_its_order():
    assert tuple(_C.divergence_names()) == registry.DIVERGENCE_NAMES


def test_every_entry_has_one_reference_formula_taking_its_parameters():
    assert set(reference.FORMULAS) == set(registry.DIVERGENCE_NAMES)
    for spec in registry.DIVERGENCE_TABLE:
        args = list(inspect.signature(reference.FORMULAS[spec.name]).parameters)
        assert args == ["logp", "logq"] + [p.name for p in spec.params], spec.name


def test_every_entry_has_a_triton_policy():
    source = inspect.getsource(pytest.importorskip("kdfast.ops.triton.divergences"))
    for name in registry.DIVERGENCE_NAMES:
        assert source.count(f'DIV == "{name}"') >= 2, f"{name}: no Triton value_term/grad_term branch"


@pytest.mark.parametrize("spec", registry.DIVERGENCE_TABLE, ids=lambda s: s.name)
def test_validation_follows_the_table(spec):
    name, *_ = resolve_divergence(spec.name)
    assert name == spec.name or spec.rename(spec.defaults()) == name
    for param in spec.params:
        if param.low > -math.inf:
            bad = param.low if param.low_open else param.low - 1.0
            with pytest.raises(ValueError, match=f"{spec.name} needs {param.name}"):
                resolve_divergence(spec.name, **{param.name: bad})
        if param.high < math.inf:
            with pytest.raises(ValueError, match=f"{spec.name} needs {param.name}"):
                resolve_divergence(spec.name, **{param.name: param.high + 1.0})
    for other in {"alpha", "beta", "skew"} - {p.name for p in spec.params}:
        with pytest.raises(ValueError, match=f"takes no parameter {other}"):
            resolve_divergence(spec.name, **{other: 0.5})


def test_the_renames_of_the_boundary_cases():
    assert resolve_divergence("jsd", beta=0.0)[0] == "kl"
    assert resolve_divergence("jsd", beta=1.0)[0] == "reverse_kl"
    assert resolve_divergence("skew_kl", skew=0.0)[0] == "kl"
    assert resolve_divergence("skew_reverse_kl", skew=0.0)[0] == "reverse_kl"
    assert resolve_divergence("skew_kl", skew=1.0)[0] == "skew_kl"
    assert resolve_divergence("renyi", alpha=1.0 + registry.RENYI_KL_WINDOW / 2)[0] == "kl"
    assert resolve_divergence("renyi", alpha=1.0 + 2 * registry.RENYI_KL_WINDOW)[0] == "renyi"


@pytest.mark.parametrize("name,params,w_p", [("jsd", {"beta": 0.3}, 0.3), ("skew_kl", {"skew": 0.1}, 0.1),
                                              ("skew_reverse_kl", {"skew": 0.1}, 0.9), ("skew_kl", {"skew": 0.0}, 0.0)])
def test_mixture_log_weights(name, params, w_p):
    log_w_p, log_w_q = registry.mixture_log_weights(name, params)
    assert math.exp(log_w_p) == pytest.approx(w_p) and math.exp(log_w_q) == pytest.approx(1 - w_p)
    assert registry.mixture_log_weights("kl", {}) == (0.0, 0.0)


def test_the_sum_of_g_is_known_exactly_where_the_table_says():
    """kl and renyi: sum_j q_j dD/dq_j = -1 (checked on the reference by autograd)."""
    logp = torch.log_softmax(torch.randn(3, 11, dtype=torch.float64), -1)
    for spec in registry.DIVERGENCE_TABLE:
        params = dict(spec.cases[0])
        logq = torch.log_softmax(torch.randn(3, 11, dtype=torch.float64), -1).requires_grad_(True)
        (dd_dq,) = torch.autograd.grad(reference.FORMULAS[spec.name](logp, logq, **params).sum(), logq)
        # d D / d log q_j = q_j d D / d q_j = g_j
        gsum = dd_dq.sum(-1)
        if spec.grad_sum is not None:
            torch.testing.assert_close(gsum, torch.full_like(gsum, spec.grad_sum))


def test_hellinger_is_the_squared_hellinger_distance():
    p = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.25, 0.5]], dtype=torch.float64)
    expected = ((p.sqrt() - q.sqrt()) ** 2).sum()
    got = reference.hellinger(p.log(), q.log())
    torch.testing.assert_close(got.sum(), expected)
    assert float(reference.hellinger(q.log(), q.log()).sum()) == 0.0


@pytest.mark.skipif(_C is None, reason="the C++ extension is not built")
def test_the_cpp_weighting_and_kernel_param_lists_are_the_tables():
    assert tuple(_C.weighting_names()) == registry.WEIGHTING_NAMES
    assert tuple(_C.kernel_param_names()) == registry.KERNEL_PARAMS


def test_every_weighting_has_one_reference_formula_and_a_triton_policy():
    assert tuple(reference.WEIGHT_FORMULAS) == registry.WEIGHTING_NAMES
    source = inspect.getsource(pytest.importorskip("kdfast.ops.triton.weightings"))
    for name in registry.WEIGHTING_NAMES:
        assert f'WEIGHTING == "{name}"' in source, f"{name}: no Triton row_weight branch"


def test_the_triton_parameter_vector_holds_the_kernel_params():
    row_kernel = pytest.importorskip("kdfast.ops.triton.row_kernel")
    assert set(registry.KERNEL_PARAMS) <= set(row_kernel.PARAMS)


@pytest.mark.parametrize("name,params,want", [
    ("kl", {}, {}),
    ("ab", {"alpha": 0.8, "beta": 0.3}, {"alpha": 0.8, "beta": 0.3}),
    ("jsd", {"beta": 0.25}, {"beta": 0.25, "log_w_p": math.log(0.25), "log_w_q": math.log(0.75)}),
    ("skew_reverse_kl", {"skew": 0.1}, {"skew": 0.1, "log_w_p": math.log(0.9), "log_w_q": math.log(0.1)}),
])
def test_the_ops_params_vector(name, params, want):
    got = dict(zip(registry.KERNEL_PARAMS, registry.kernel_params(name, params)))
    assert got == pytest.approx({k: want.get(k, 0.0) for k in registry.KERNEL_PARAMS})


def test_indices_are_positions_in_the_tables():
    for index, names in ((registry.divergence_index, registry.DIVERGENCE_NAMES),
                         (registry.weighting_index, registry.WEIGHTING_NAMES)):
        assert [index(n) for n in names] == list(range(len(names)))
    with pytest.raises(ValueError, match="divergence must be one of"):
        registry.divergence_index("nope")
    with pytest.raises(ValueError, match="weighting must be one of"):
        registry.weighting_index("nope")


def _call_op_with(backend, **changes):
    """The fused op on small logits, its arguments from loss_arguments with ``changes`` by name."""
    from kdfast.config import make_config
    from kdfast.ops.fused_op import loss_arguments

    s, t = torch.randn(3, 7), torch.randn(3, 7)
    names = ("labels", "weights", "divergence", "params", "weighting")
    args = list(loss_arguments(make_config(s, t)))
    for name, value in changes.items():
        args[names.index(name)] = value
    if backend == "cpu":
        return torch.ops.kdfast.distill_forward(s, t, *args, False)
    from kdfast.ops.triton.op import distill_forward_triton
    return distill_forward_triton(s, t, *args, False)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("change,message", [
    (dict(divergence=len(registry.DIVERGENCE_NAMES)), "divergence must be an index"),
    (dict(divergence=-1), "divergence must be an index"),
    (dict(weighting=len(registry.WEIGHTING_NAMES)), "weighting must be an index"),
    (dict(params=[0.0]), "params must have"),
    (dict(weighting=registry.weighting_index("given")), "one entry per row"),
])
def test_the_ops_refuse_arguments_past_their_tables(backend, change, message):
    """A direct caller of the op (not through distill_loss) cannot index past the dispatch tables."""
    if backend not in kdfast.available_backends():
        pytest.skip(f"backend {backend} is not available")
    with pytest.raises((ValueError, RuntimeError), match=message):
        _call_op_with(backend, **change)
