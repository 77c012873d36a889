"""The loss options written once (kdfast.config.LossConfig) and the config passed down as is.

Every public loss that takes the options shows them in its signature with the
defaults of docs/contract.md (section 4) and documents them in its docstring,
refuses a keyword it does not take in Python's own words, and builds its
``LossConfig`` once per call, however many chunks its loop runs.
"""

from __future__ import annotations

import inspect
import sys

import pytest
import torch

import kdfast
from conftest import FUSED_BACKENDS, logits
from kdfast import config
from kdfast.config import LOSS_OPTIONS, OPTIONS_HEADING, LossConfig, make_config, option_doc
from kdfast.llm.topk import TopKDistillLoss
from kdfast.llm.fused_linear import FusedLinearDistillLoss, FusedLinearTopKDistillLoss

# docs/contract.md, section 4.
CONTRACT_DEFAULTS = dict(divergence="kl", temperature=1.0, student_temperature=None, alpha=None, beta=None,
                         skew=None, weighting=None, labels=None, ignore_index=-100, hard_weight=0.0,
                         soft_weight=1.0, scale=1.0, reduction="batchmean", normalizer=None, backend="auto")

# Each public loss that takes the options, its positional tensors, and the options it does not take.
TTM_FIXED = ("divergence", "student_temperature", "scale")
PUBLIC_LOSSES = [
    (kdfast.distill_loss, 2, ()),
    (kdfast.kd_loss, 2, TTM_FIXED),
    (kdfast.ttm_loss, 2, TTM_FIXED),
    (kdfast.wttm_loss, 2, TTM_FIXED + ("weighting",)),
    (kdfast.topk_distill_loss, 3, ("weighting",)),
    (kdfast.fused_linear_distill_loss, 4, ()),
    (kdfast.fused_linear_topk_distill_loss, 4, ("weighting",)),
    (kdfast.vocab_parallel_distill_loss, 2, ("backend",)),
]
loss_ids = [fn.__name__ for fn, _, _ in PUBLIC_LOSSES]


def test_the_table_has_the_defaults_of_the_contract():
    assert {option.name: option.default for option in LOSS_OPTIONS} == CONTRACT_DEFAULTS


@pytest.mark.parametrize("fn,positional,not_taken", PUBLIC_LOSSES, ids=loss_ids)
def test_the_signature_lists_every_option_with_its_default(fn, positional, not_taken):
    parameters = inspect.signature(fn).parameters
    for name, default in CONTRACT_DEFAULTS.items():
        if name in not_taken:
            assert name not in parameters
        else:
            assert parameters[name].default == default, name
    assert not any(p.kind == p.VAR_KEYWORD for p in parameters.values())


@pytest.mark.parametrize("fn,positional,not_taken", PUBLIC_LOSSES, ids=loss_ids)
def test_the_docstring_has_the_options_section(fn, positional, not_taken):
    doc = inspect.getdoc(fn)
    assert OPTIONS_HEADING in doc
    for option in LOSS_OPTIONS:
        assert (option_doc(option) in doc) == (option.name not in not_taken), option.name


def _python_message(name: str, keyword: str) -> str:
    """What Python itself says when a function called ``name`` gets an unknown keyword."""
    namespace = {}
    exec(f"def {name}(): pass", namespace)
    with pytest.raises(TypeError) as error:
        namespace[name](**{keyword: 1})
    return str(error.value)


@pytest.mark.parametrize("fn,positional,not_taken", PUBLIC_LOSSES, ids=loss_ids)
def test_an_unknown_keyword_is_pythons_type_error(fn, positional, not_taken):
    # Refused before the body runs: the tensors are never looked at.
    with pytest.raises(TypeError) as error:
        fn(*[None] * positional, temprature=2.0)
    assert str(error.value) == _python_message(fn.__name__, "temprature")
    for name in not_taken:
        with pytest.raises(TypeError, match=f"{fn.__name__}\\(\\) (fixes |got an unexpected keyword argument '){name}"):
            fn(*[None] * positional, **{name: CONTRACT_DEFAULTS[name]})


def test_make_config_refuses_an_unknown_keyword():
    s, t = logits((2, 5)), logits((2, 5), seed=1)
    with pytest.raises(TypeError, match="got an unexpected keyword argument 'temprature'"):
        make_config(s, t, temprature=2.0)


def test_make_config_gives_canonical_values():
    s, t = logits((2, 5)), logits((2, 5), seed=1)
    cfg = make_config(s, t, divergence="jsd", temperature=2, ignore_index=torch.tensor(-1))
    assert (cfg.beta, cfg.temperature, cfg.student_temperature, cfg.ignore_index) == (0.5, 2.0, 2.0, -1)
    assert type(cfg.temperature) is float and type(cfg.ignore_index) is int
    assert make_config(s, t, divergence="jsd", beta=0.0).divergence == "kl"


def test_select_rows_slices_the_per_row_tensors():
    labels = torch.arange(6).reshape(2, 3)
    cfg = LossConfig(labels=labels, weighting=torch.linspace(0, 1, 6).reshape(3, 2), normalizer=4.0)
    rows = cfg.select_rows(slice(2, 5))
    assert torch.equal(rows.labels, torch.tensor([2, 3, 4]))
    assert torch.equal(rows.weighting, torch.linspace(0, 1, 6)[2:5])
    assert rows.normalizer == 4.0 and LossConfig(weighting="wttm").select_rows(slice(0, 1)).weighting == "wttm"


# ----------------------------------------------------------------- the config is built once per call
@pytest.fixture
def config_counts(monkeypatch):
    """Counts of ``make_config`` calls (wherever it was imported) and of the per-chunk configs."""
    counts = {"make_config": 0, "chunks": 0}
    make, select = config.make_config, LossConfig.select_rows

    def counted_make(*args, **kwargs):
        counts["make_config"] += 1
        return make(*args, **kwargs)

    def counted_select(self, rows):
        counts["chunks"] += 1
        return select(self, rows)

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("kdfast") and getattr(module, "make_config", None) is make:
            monkeypatch.setattr(module, "make_config", counted_make)
    monkeypatch.setattr(LossConfig, "select_rows", counted_select)
    return counts


def _heads(rows=40, hidden=6, vocab=11):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(rows, hidden, generator=g, dtype=torch.float64).requires_grad_(),
            torch.randn(vocab, hidden, generator=g, dtype=torch.float64).requires_grad_(),
            torch.randn(rows, hidden, generator=g, dtype=torch.float64),
            torch.randn(vocab, hidden, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("backend", ["torch", *FUSED_BACKENDS])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_the_fused_linear_loss_builds_its_config_once(config_counts, backend, reduction):
    student_hidden, student_weight, teacher_hidden, teacher_weight = _heads()
    labels = torch.arange(40) % 11
    labels[::5] = -100
    weights = torch.rand(40, dtype=torch.float64)
    loss = kdfast.fused_linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                            chunk_size=8, divergence="jsd", weighting=weights, hard_weight=0.5,
                                            reduction=reduction, backend=backend)
    loss.sum().backward()
    assert config_counts["make_config"] == 1
    assert config_counts["chunks"] == (5 if reduction == "batchmean" else 10)  # "none" reruns the chunks backward


def test_the_fused_linear_topk_loss_builds_its_config_once(config_counts):
    student_hidden, student_weight, _, teacher_weight = _heads()
    logprobs, indices = torch.log_softmax(student_hidden.detach() @ teacher_weight.T, -1).topk(4, dim=-1)
    loss = kdfast.fused_linear_topk_distill_loss(student_hidden, student_weight, indices, logprobs,
                                                 torch.arange(40) % 11, chunk_size=8, tail="bucket", hard_weight=0.5)
    loss.backward()
    assert (config_counts["make_config"], config_counts["chunks"]) == (1, 5)


# ----------------------------------------------------------------- the modules check their options when built
@pytest.mark.parametrize("build,error,pattern", [
    (lambda: kdfast.DistillLoss(temprature=2.0), TypeError, "distill_loss\\(\\) got an unexpected keyword"),
    (lambda: kdfast.DistillLoss(temperature=0.0), ValueError, "temperature must be > 0"),
    (lambda: kdfast.DistillLoss(reduction="mean"), ValueError, "reduction must be one of"),
    (lambda: kdfast.DistillLoss(student_logits=torch.zeros(2)), TypeError, "call time"),
    (lambda: kdfast.KDLoss(scale=2.0), TypeError, "kd_loss\\(\\) fixes scale"),
    (lambda: kdfast.WTTMLoss(weighting="entropy"), TypeError, "wttm_loss\\(\\) fixes weighting"),
    (lambda: TopKDistillLoss(weighting="wttm"), TypeError, "unexpected keyword argument 'weighting'"),
    (lambda: FusedLinearDistillLoss(chunk_size=0), ValueError, "chunk_size must be >= 1"),
    (lambda: FusedLinearDistillLoss(softcap=-1.0), ValueError, "softcap must be > 0"),
    (lambda: FusedLinearDistillLoss(vocab_policy="pad"), ValueError, "vocab_policy must be one of"),
    (lambda: FusedLinearDistillLoss(hard_weight=float("nan")), ValueError, "hard_weight must be finite"),
    (lambda: FusedLinearTopKDistillLoss(tail="spread"), ValueError, "tail must be one of"),
    (lambda: FusedLinearTopKDistillLoss(teacher_bias=torch.zeros(3)), TypeError, "unexpected keyword"),
    (lambda: kdfast.DKDLoss(labels=torch.zeros(3)), TypeError, "labels is passed at call time, not to DKDLoss"),
    (lambda: kdfast.DISTLoss(gama=1.0), TypeError, "dist_loss\\(\\) got an unexpected keyword argument 'gama'"),
])
def test_modules_check_their_options_when_built(build, error, pattern):
    with pytest.raises(error, match=pattern):
        build()


def test_a_module_takes_every_option_of_its_function():
    module = kdfast.DistillLoss(**{k: v for k, v in CONTRACT_DEFAULTS.items() if k != "labels"})
    s, t = logits((3, 7)), logits((3, 7), seed=1)
    torch.testing.assert_close(module(s, t), kdfast.distill_loss(s, t))
