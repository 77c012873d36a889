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
