"""One training step's loss alone, at the run's shape: the fused linear loss against the eager baseline.

Both compute the same value (CE + KD of the student and teacher heads, as in
:class:`~.objectives.FusedLinearKDObjective`) and the same gradients (of the
student's hidden states and LM-head weight):

* ``fused_linear``: ``kdfast.llm.fused_linear.fused_linear_distill_loss`` on the
  hidden states and head weights; logits exist one chunk of rows at a time.
* ``eager``: both ``(N, V)`` logits materialised (``hidden @ weight.T``), then
  ``kdfast.distill_loss`` on them, then autograd back through the matmul.

Time is the median of ``runs`` forward+backward calls after one warm-up;
memory is the peak extra resident memory of one call
(``kdfast.bench.memory``: VmHWM of the process, which sees every allocation).
"""

from __future__ import annotations

import statistics
from typing import Callable, Dict

import torch

from .objectives import DistillationSettings


def loss_steps(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
               teacher_weight: torch.Tensor, input_ids: torch.Tensor,
               settings: DistillationSettings) -> Dict[str, Callable[[], tuple]]:
    """The two forward+backward calls, by name; each returns ``(loss, grad of hidden, grad of weight)``."""
    import kdfast
    from kdfast.llm.fused_linear import fused_linear_distill_loss

    options = settings.loss_options()

    def leaves():
        return student_hidden.detach().clone().requires_grad_(True), student_weight.detach().clone().requires_grad_(True)

    def fused_linear():
        hidden, weight = leaves()
        loss = fused_linear_distill_loss(hidden, weight, teacher_hidden, teacher_weight, input_ids, shift=True,
                                         **options)
        loss.backward()
        return loss.detach(), hidden.grad, weight.grad

    def eager():
        hidden, weight = leaves()
        student_logits = hidden @ weight.T
        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_weight.T
        # The causal shift: position t predicts token t + 1; the last position predicts nothing.
        loss = kdfast.distill_loss(student_logits[:, :-1], teacher_logits[:, :-1], labels=input_ids[:, 1:],
                                   **options)
        loss.backward()
        return loss.detach(), hidden.grad, weight.grad

    return {"fused_linear": fused_linear, "eager": eager}


def benchmark_loss_step(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                        teacher_weight: torch.Tensor, input_ids: torch.Tensor, settings: DistillationSettings,
                        *, runs: int) -> dict:
    """Median time and peak memory of each loss step, the values they give and how far apart they are."""
    import kdfast

    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs must be an int >= 1, got {runs!r}")
    from kdfast.bench.memory import peak_extra_bytes
    from kdfast.bench.timing import time_runs

    steps = loss_steps(student_hidden, student_weight, teacher_hidden, teacher_weight, input_ids, settings)
    records = {}
    outputs = {}
    for name, step in steps.items():
        outputs[name] = step()  # warm-up (and the values compared below)
        times = time_runs(step, runs, 0, student_hidden.device)
        # The CPU kernels keep their gradient buffers for reuse; start each measurement without them.
        kdfast.empty_cache()
        records[name] = {"median_s": statistics.median(times), "times_s": times,
                         "peak_extra_bytes": peak_extra_bytes(step), "loss": float(outputs[name][0])}
    (fused_loss, fused_dh, fused_dw), (eager_loss, eager_dh, eager_dw) = outputs["fused_linear"], outputs["eager"]
    return {
        "rows": int(input_ids.shape[0] * (input_ids.shape[1] - 1)),
        "vocab_size": int(student_weight.shape[0]),
        "student_hidden": int(student_weight.shape[1]),
        "teacher_hidden": int(teacher_weight.shape[1]),
        "runs": runs,
        "methods": records,
        "loss_rel_diff": abs(float(fused_loss) - float(eager_loss)) / max(abs(float(eager_loss)), 1e-30),
        "grad_hidden_max_abs_diff": float((fused_dh - eager_dh).abs().max()),
        "grad_weight_max_abs_diff": float((fused_dw - eager_dw).abs().max()),
    }
