"""Same inputs give bit-identical losses and gradients, run to run and across thread counts."""

import pytest
import torch

from conftest import FUSED_BACKENDS, logits, loss_and_grad


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "jsd", "renyi"])
def test_bit_identical_runs_and_thread_counts(backend, divergence):
    s, t = logits((33, 5003), seed=1), logits((33, 5003), seed=2)
    labels = torch.arange(33) * 7
    kw = dict(divergence=divergence, labels=labels, hard_weight=0.3, temperature=2.0, backend=backend)
    first = loss_and_grad(s, t, **kw)
    second = loss_and_grad(s, t, **kw)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = loss_and_grad(s, t, **kw)
    finally:
        torch.set_num_threads(threads)
    for other in (second, single):
        assert torch.equal(first[0], other[0])
        assert torch.equal(first[1], other[1])
