"""The two halves of a causal LM that the fused losses take apart: the trunk's hidden states and the head's weight.

``logits = final_hidden_states(model, ids) @ lm_head_weight(model).T``: the
fused linear losses receive these two factors instead of the ``(N, V)`` logits.
"""

from __future__ import annotations

import torch


def final_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The hidden states after the final norm, the input of the LM head: ``(B, T, H)``.

    Works for the ``*ForCausalLM`` models of transformers, whose trunk is ``model.model``.
    Gradients flow when enabled (the student); wrap in ``torch.no_grad()`` for a teacher.
    """
    return model.model(input_ids=input_ids).last_hidden_state


def lm_head_weight(model: torch.nn.Module) -> torch.Tensor:
    """The ``(V, H)`` weight of a causal LM's output layer (tied to the input embedding or not).

    Raises:
        ValueError: the output layer has a bias (the losses here take a weight only).
    """
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("this example expects an LM head without bias")
    return head.weight
