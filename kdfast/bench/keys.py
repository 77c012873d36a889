"""How a result record names its case: the loss, shape and dtype, and for the top-k losses the tail and k.

A top-k case is one loss at one shape and dtype *and* one teacher: its tail
(``renormalize`` / ``bucket``) and its ``k``, so that both tails and several
``k`` can share one run and one file.  Every place that groups records by case
(ratios, the table, the plots, ``--compare``, the memory subprocesses) goes
through :func:`case_key` and :func:`case_label`; records of the other losses
have no such fields and keep their ``(loss, shape, dtype)`` names.

This module does not import torch: result files are compared and plotted
without it.
"""

from __future__ import annotations

# The fields of a record that, where present, tell apart cases of one loss, shape and dtype.
VARIANT_FIELDS = ("tail", "topk")


def variant_of(record: dict) -> dict:
    """The record's variant fields that are set (``{}`` for the losses that have none)."""
    return {field: record[field] for field in VARIANT_FIELDS if record.get(field) is not None}


def case_key(record: dict) -> tuple:
    """``(loss, shape, dtype, tail, topk)``, None where a field does not apply: one key per case."""
    return (record["loss"], record["shape"], record["dtype"], *(record.get(field) for field in VARIANT_FIELDS))


def loss_label(record: dict) -> str:
    """The loss with its variant: ``kl``, ``topk[bucket,k=64]``."""
    variant = variant_of(record)
    if not variant:
        return record["loss"]
    parts = [str(variant["tail"])] if "tail" in variant else []
    parts += [f"k={variant['topk']}"] if "topk" in variant else []
    return f"{record['loss']}[{','.join(parts)}]"


def case_label(record: dict) -> str:
    """``"<loss label> <shape> <dtype>"``: how messages name a case."""
    return f"{loss_label(record)} {record['shape']} {record['dtype']}"
