"""Taking a causal LM apart into the two factors the fused linear losses need: trunk and LM head.

``logits = post(trunk(input_ids) @ head.weight.T + head.bias)``, where ``post``
is what some architectures do to the head's output: a linear factor (Cohere's
``logit_scale``, Granite's and MiniCPM3's ``1 / logits_scaling``, Falcon-H1's
``lm_head_multiplier``), and Gemma's soft-capping ``c * tanh(z / c)``
(``final_logit_softcapping``).  :func:`split_causal_lm` finds the pieces
through the public model API of ``transformers``:

* the head: ``model.get_output_embeddings()``, an ``nn.Linear`` (tied to the
  input embedding or not, with or without a bias);
* the trunk: ``model.get_decoder()`` (Llama, Qwen, Mistral, Gemma: ``model.model``;
  GPT-2: ``model.transformer``), else ``model.base_model``;
* a PEFT wrapper is unwrapped with ``get_base_model()``;
* the linear factor and the softcap from the (text) config.

The linear factor is moved onto the hidden states (``s * (h W^T + b) = (s h) W^T
+ s b``), so the loss needs the softcap only.  Every split is checked once
(``verify=True``) against the model's own logits on a few tokens: an
architecture that does anything else between its trunk and its logits is
refused with a clear error instead of being distilled with the wrong logits.

Nothing here imports ``transformers``: the models are used by duck typing.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import nn

__all__ = ["CausalLMParts", "UnsplittableModelError", "check_distillable_pair", "split_causal_lm", "takes_keyword",
           "takes_logits_to_keep", "unwrap_model"]

# Config attributes that scale the LM head's output by a constant: (name, whether the logits are divided by it).
_LOGIT_FACTORS = (("logit_scale", False), ("logits_scaling", True), ("lm_head_multiplier", False))
# The positions the split is checked on (any token ids; a few are enough to catch a wrong split).
_VERIFY_TOKENS = 8


class UnsplittableModelError(ValueError):
    """A model whose logits are not ``lm_head(trunk(...))`` as :func:`split_causal_lm` can find them."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside its wrappers: PEFT's (``get_base_model()``) and ``torch.compile``'s (``_orig_mod``)."""
    for _ in range(8):  # wrappers nest a few levels at most
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif callable(getattr(model, "get_base_model", None)):
            if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
                raise UnsplittableModelError(
                    f"kdfast cannot split {type(model).__name__}: its PEFT adapter is a prompt-learning one "
                    f"(virtual tokens that only the wrapper's forward adds); adapters such as LoRA work")
            inner = model.get_base_model()
            if inner is model:
                break
            model = inner
        else:
            break
    return model


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model``'s forward takes ``logits_to_keep`` (the causal LMs of ``transformers`` do)."""
    return takes_keyword(model, "logits_to_keep")


@dataclass(frozen=True, eq=False)
class CausalLMParts:
    """The trunk and LM head of a causal LM (from :func:`split_causal_lm`).

    ``logits == softcap(hidden_states(...) @ weight.T + bias)`` where
    ``hidden_states`` already carries the model's linear logit factor
    (``logit_factor``) and ``softcap`` is None or Gemma's ``c``.
    """

    model: nn.Module
    trunk: nn.Module
    head: nn.Linear
    softcap: Optional[float]
    logit_factor: float

    @property
    def weight(self) -> torch.Tensor:
        """The ``(V, H)`` LM-head weight (the input embedding's when tied)."""
        return self.head.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The ``(V,)`` LM-head bias times the logit factor, or None."""
        bias = self.head.bias
        if bias is None or self.logit_factor == 1.0:
            return bias
        return bias * self.logit_factor

    @property
    def vocab_size(self) -> int:
        return self.head.weight.shape[0]

    @property
    def device(self) -> torch.device:
        """Where the trunk takes its inputs (the device of the input embedding)."""
        embeddings = getattr(self.model, "get_input_embeddings", lambda: None)()
        weight = getattr(embeddings, "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight.device
        return next(self.trunk.parameters()).device

    def hidden_states(self, inputs: Mapping[str, object]) -> torch.Tensor:
        """``(B, T, H)``: the trunk's last hidden states for ``inputs`` (model keywords), times the logit factor.

        Differentiable when grad mode is on; wrap in ``torch.no_grad()`` for a teacher.
        """
        kwargs = dict(inputs)
        if takes_keyword(self.trunk, "use_cache"):
            kwargs.setdefault("use_cache", False)  # no KV cache in training
        return self._scaled(self.trunk(**kwargs))

    def hidden_states_through(self, wrapper: nn.Module, inputs: Mapping[str, object]) -> torch.Tensor:
        """:meth:`hidden_states` taken from a call of ``wrapper``, the distributed wrapper (DDP) around the model.

        DDP averages the gradients only of a backward that follows its own
        forward, so the trunk runs inside ``wrapper(**inputs)``, its output
        caught by a forward hook; the model's head computes the logits of the
        last position only (``logits_to_keep=1``: see :func:`takes_logits_to_keep`),
        which the loss ignores.
        """
        caught = []
        handle = self.trunk.register_forward_hook(lambda module, args, output: caught.append(output))
        try:
            kwargs = dict(inputs, logits_to_keep=1)
            if takes_keyword(self.model, "use_cache"):
                kwargs.setdefault("use_cache", False)
            wrapper(**kwargs)
        finally:
            handle.remove()
        if not caught:
            raise RuntimeError(f"{type(self.model).__name__}'s forward did not run its trunk "
                               f"{type(self.trunk).__name__}: kdfast cannot take its hidden states through the wrapper")
        return self._scaled(caught[0])

    def _scaled(self, out) -> torch.Tensor:
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden if self.logit_factor == 1.0 else hidden * self.logit_factor

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits of ``hidden`` (from :meth:`hidden_states`), materialised: for checks and small inputs only."""
        logits = nn.functional.linear(hidden, self.weight.to(hidden.dtype),
                                      None if self.bias is None else self.bias.to(hidden.dtype))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class FrozenTeacher:
    """A frozen teacher's split, seen from the student's device: its hidden states and its LM head there.

    The teacher stays where it is (its own device and dtype); its inputs go to
    it, its hidden states come back in its head's dtype, and its head is copied
    to the student's device once (it never changes).
    """

    def __init__(self, parts: CausalLMParts):
        self.parts = parts
        self._head_copy = None  # (device, the weight it copies, weight, bias)

    @torch.no_grad()
    def hidden_states(self, model_inputs: Mapping[str, object], device: torch.device) -> torch.Tensor:
        """The teacher's ``(B, T, H_t)`` hidden states for ``model_inputs``, on ``device``, in its head's dtype."""
        where = self.parts.device
        inputs = {k: v.to(where) if isinstance(v, torch.Tensor) else v for k, v in model_inputs.items()}
        return self.parts.hidden_states(inputs).to(device=device, dtype=self.parts.weight.dtype)

    def head(self, device: torch.device):
        """The teacher's head ``(weight, bias)`` on ``device``, detached."""
        weight, bias = self.parts.weight.detach(), self.parts.bias
        bias = None if bias is None else bias.detach()
        if weight.device == device:
            return weight, bias
        copy = self._head_copy
        if copy is None or copy[0] != device or copy[1] is not self.parts.weight:
            copy = (device, self.parts.weight, weight.to(device), None if bias is None else bias.to(device))
            self._head_copy = copy
        return copy[2], copy[3]


def check_distillable_pair(student: CausalLMParts, teacher: CausalLMParts, vocab_policy: str,
                           truncate_hint: str = "vocab_policy='truncate'") -> None:
    """ValueError unless the two models can be distilled token by token with ``vocab_policy``: the same vocabulary
    (or, under ``"truncate"``, a teacher vocabulary at least as large) and the same softcap; ``truncate_hint`` is
    how the caller's user sets the policy."""
    V_s, V_t = student.vocab_size, teacher.vocab_size
    names = f"the teacher {type(teacher.model).__name__} and the student {type(student.model).__name__}"
    if V_s != V_t and vocab_policy == "error":
        raise ValueError(f"{names} have different vocabulary sizes (V_t={V_t}, V_s={V_s}); distillation compares "
                         f"their distributions token by token, so they need the same tokenizer. A teacher whose "
                         f"vocabulary only pads the student's can be cut to it with {truncate_hint}")
    if V_t < V_s:
        raise ValueError(f"{names}: vocab_policy='truncate' needs a teacher vocabulary at least as large as the "
                         f"student's, got V_t={V_t} < V_s={V_s}")
    if teacher.softcap != student.softcap:
        raise ValueError(f"{names} soft-cap their logits differently (final_logit_softcapping {teacher.softcap} and "
                         f"{student.softcap}); kdfast's fused loss applies one softcap to both")


def split_causal_lm(model: nn.Module, *, verify: bool = True) -> CausalLMParts:
    """The trunk and LM head of a causal LM of ``transformers`` (PEFT-wrapped or not).

    Args:
        model: a ``*ForCausalLM`` model (Llama, Qwen, Mistral, Gemma, GPT-2 and
            the like), possibly wrapped by PEFT or ``torch.compile``.
        verify: check once, on a few tokens, that the split reproduces the
            model's own logits (``model(input_ids).logits``); a model whose
            logits come about otherwise is refused.

    Raises:
        UnsplittableModelError (a ValueError): the model has no linear output
            layer, no trunk apart from it, a LoRA adapter on its head, or logits
            that the split does not reproduce; the message names the model class.
    """
    inner = unwrap_model(model)
    name = type(inner).__name__
    head = _output_layer(inner, name)
    trunk = _trunk(inner, head, name)
    config = _text_config(inner)
    softcap = getattr(config, "final_logit_softcapping", None)
    parts = CausalLMParts(inner, trunk, head, float(softcap) if softcap else None, _logit_factor(config, name))
    if verify:
        _verify(parts, name)
    return parts


# ----------------------------------------------------------------- the pieces
def _output_layer(model: nn.Module, name: str) -> nn.Linear:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise UnsplittableModelError(
            f"kdfast cannot split {name}: it has no output layer (get_output_embeddings() is missing or None); "
            f"pass a causal LM with an LM head, e.g. AutoModelForCausalLM")
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
        raise UnsplittableModelError(
            f"kdfast cannot split {name}: its LM head {type(head).__name__} carries a PEFT adapter; leave the head "
            f"out of the adapter's target_modules (or merge the adapter first)")
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise UnsplittableModelError(
            f"kdfast cannot split {name}: its output layer is a {type(head).__name__}, not a plain nn.Linear, so "
            f"its logits are not hidden @ weight.T + bias")
    return head


def _trunk(model: nn.Module, head: nn.Module, name: str) -> nn.Module:
    candidates = []
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            candidates.append(get_decoder())
        except (AttributeError, NotImplementedError, ValueError):
            pass
    candidates.append(getattr(model, "base_model", None))
    for trunk in candidates:
        if isinstance(trunk, nn.Module) and trunk is not model and not any(m is head for m in trunk.modules()):
            return trunk
    raise UnsplittableModelError(
        f"kdfast cannot split {name}: neither get_decoder() nor base_model gives a trunk apart from the LM head")


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        try:
            return get_text_config()
        except (ValueError, AttributeError):
            pass
    return config


def _logit_factor(config, name: str) -> float:
    factor = 1.0
    for attr, divides in _LOGIT_FACTORS:
        value = getattr(config, attr, None)
        if value is None or isinstance(value, bool):
            continue
        value = float(value)
        if not value or value != value:
            raise UnsplittableModelError(f"kdfast cannot split {name}: its config has {attr}={value!r}")
        factor = factor / value if divides else factor * value
    return factor


def takes_keyword(module: nn.Module, keyword: str) -> bool:
    """Whether ``module``'s forward names ``keyword`` (a ``**kwargs`` catch-all does not count)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return keyword in params


def _verify(parts: CausalLMParts, name: str) -> None:
    """UnsplittableModelError unless the split reproduces ``model(input_ids).logits`` on a few tokens."""
    model = parts.model
    V = parts.vocab_size
    ids = (torch.arange(_VERIFY_TOKENS) * 7919 + 1).remainder(V).unsqueeze(0).to(parts.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                out = model(input_ids=ids, use_cache=False) if takes_keyword(model, "use_cache") else model(
                    input_ids=ids)
                expected = out.logits if hasattr(out, "logits") else out[0]
                hidden = parts.hidden_states({"input_ids": ids})
            except Exception as error:  # noqa: BLE001 - any failure means the model cannot be used this way
                raise UnsplittableModelError(
                    f"kdfast cannot split {name}: running it on input_ids alone failed "
                    f"({type(error).__name__}: {error})") from error
            got = parts.logits(hidden.to(parts.weight.dtype))
    finally:
        model.train(was_training)
    if tuple(got.shape) != tuple(expected.shape):
        raise UnsplittableModelError(
            f"kdfast cannot split {name}: lm_head(trunk) gives logits of shape {tuple(got.shape)}, the model "
            f"{tuple(expected.shape)}")
    expected = expected.double()
    tol = {torch.float64: 1e-8, torch.float32: 1e-3}.get(got.dtype, 3e-2)
    diff = float((got.double() - expected).abs().max()) if got.numel() else 0.0
    if not diff <= tol * (1.0 + float(expected.abs().max())):
        raise UnsplittableModelError(
            f"kdfast cannot split {name}: its logits are not lm_head({type(parts.trunk).__name__}(...)) as found "
            f"through get_output_embeddings() and get_decoder()/base_model (max difference {diff:.3g}); the model "
            f"transforms its hidden states or logits in a way kdfast does not know")
