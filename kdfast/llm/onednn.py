"""oneDNN's matrix product for the LM-head logits of a chunk, where it beats ``torch.mm``.

On CPU, PyTorch runs float32 ``torch.mm`` through MKL.  For the logits of a
chunk of rows, ``hidden[chunk] @ weight.T`` with a few hundred rows against a
``(V, H)`` weight, oneDNN's kernel (the one behind ``torch.ops.mkldnn._linear_pointwise``,
which inductor uses for frozen CPU linears) is markedly faster: 1.47 s vs
1.91 s per 4096 rows at H = 576, V = 49152 on the 2-core AVX-512 CI machine
(``benchmarks/bench_fused_linear.py`` measures the whole loss).  It returns a
new tensor (there is no ``out=``), so a chunk's logits are allocated per chunk
instead of reusing a buffer: the same peak memory.

The chunk's hidden-state gradient ``g @ weight`` goes through the same op
with the transposed view ``weight.t()`` as its weight (oneDNN reads the strides:
no copy of the weight, measured), a few per cent faster than ``torch.mm``
with a few hundred rows (:func:`onednn_grad_rows`).

The op is private to PyTorch, so it is probed once (a small product against
``torch.mm``) and any failure falls back to ``torch.mm`` for good;
``KDFAST_ONEDNN=0`` turns it off.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch


@functools.lru_cache(maxsize=None)
def onednn_linear_works() -> bool:
    """Whether ``torch.ops.mkldnn._linear_pointwise`` exists here and computes ``x @ w.T + b`` (probed once)."""
    if os.environ.get("KDFAST_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(5, 7, generator=g), torch.randn(11, 7, generator=g), torch.randn(11, generator=g)
        with torch.no_grad():
            got = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
            g = torch.randn(5, 11, generator=g)
            got_t = torch.ops.mkldnn._linear_pointwise(g, w.t(), None, "none", [], "")  # g @ w: see onednn_grad_rows
        return bool(torch.allclose(got, torch.addmm(b, x, w.t()), rtol=1e-5, atol=1e-5)
                    and torch.allclose(got_t, g @ w, rtol=1e-5, atol=1e-5))
    except Exception:  # noqa: BLE001 - a missing or changed private op: use torch.mm
        return False


def uses_onednn(weight: torch.Tensor) -> bool:
    """Whether the chunk logits of this head go through oneDNN: a contiguous float32 CPU weight."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.is_contiguous()
            and onednn_linear_works())


def onednn_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``hidden @ weight.T (+ bias)`` as a new contiguous tensor, by oneDNN (see :func:`uses_onednn`)."""
    return torch.ops.mkldnn._linear_pointwise(hidden.contiguous(), weight, bias, "none", [], "")


def onednn_grad_rows(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``grad @ weight`` (a chunk's hidden-state gradient) as a new tensor, by oneDNN (see :func:`uses_onednn`)."""
    return torch.ops.mkldnn._linear_pointwise(grad.contiguous(), weight.t(), None, "none", [], "")
