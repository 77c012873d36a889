"""Each divergence's time as a multiple of KL's, the losses timed in turns (round-robin) in one process.

``kdfast bench`` times one loss after another, so on a VM whose memory speed
swings between minutes a ratio of two losses can move by 0.1 from run to run.
Here every run times every loss once, in a fixed rotation, and the ratio of
a loss is the median over runs of its time divided by KL's time *in the same
run* (paired), next to the ratio of the medians.  Forward + backward of
``kdfast.distill_loss`` on the device's fused backend, the settings of
``kdfast bench`` (``kdfast.bench.families.loss_options``: Hinton's ``T**2``,
the benchmark's divergence parameters) plus ``kl+labels``: KL with the
hard-label term (``labels``, ``hard_weight=0.5``, the student's temperature
at T, so its CE softmax needs the student at temperature 1).

    python benchmarks/bench_divergence_ratios.py --shape 4096x32000 --dtype bfloat16 --threads 2
    KDFAST_CPU_CAPABILITY=avx2 python benchmarks/bench_divergence_ratios.py ...   # a lower SIMD level
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import kdfast
from kdfast.bench.families import loss_options, make_logits
from kdfast.bench.machine import describe_machine, machine_info
from kdfast.bench.timing import time_round_robin

LOSSES = ("kl", "reverse_kl", "jsd", "tvd", "renyi", "ab", "skew_kl", "skew_reverse_kl", "hellinger", "wttm",
          "entropy", "kl+labels")


def loss_step(loss: str, s: torch.Tensor, t: torch.Tensor, temperature: float):
    """A zero-argument callable: one forward + backward of ``loss``, returning its seconds."""
    if loss == "kl+labels":
        labels = torch.arange(s.shape[0], device=s.device) % s.shape[1]
        options = dict(loss_options("kl", temperature), labels=labels, hard_weight=0.5)
    else:
        options = loss_options(loss, temperature)

    def step() -> float:
        t0 = time.perf_counter()
        kdfast.distill_loss(s, t, **options).backward()
        elapsed = time.perf_counter() - t0
        s.grad = None
        return elapsed

    return step


def measure(losses, N: int, V: int, dtype: torch.dtype, temperature: float, runs: int, warmup: int) -> dict:
    s, t = make_logits(N, V, dtype, "cpu")
    steps = {loss: loss_step(loss, s, t, temperature) for loss in losses}
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = time_round_robin(steps, runs)
    kl = times["kl"]
    return {loss: {"times_s": ts, "median_s": statistics.median(ts),
                   "ratio_of_medians": statistics.median(ts) / statistics.median(kl),
                   "paired_ratio": statistics.median(a / b for a, b in zip(ts, kl))}
            for loss, ts in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="4096x32000", help="rows x vocabulary (default 4096x32000)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    losses = ["kl"] + [loss for loss in args.losses if loss != "kl"]
    N, V = (int(x) for x in args.shape.lower().split("x"))
    info = machine_info("cpu")
    print("#", describe_machine(info))
    print(f"# {args.shape} {args.dtype}, T = {args.temperature}, forward + backward, {args.runs} runs in turns "
          f"after {args.warmup}")
    results = measure(losses, N, V, getattr(torch, args.dtype), args.temperature, args.runs, args.warmup)
    print(f"{'loss':18s} {'median ms':>10s} {'x KL (paired)':>14s} {'x KL (medians)':>15s}")
    for loss, r in results.items():
        print(f"{loss:18s} {r['median_s'] * 1e3:10.2f} {r['paired_ratio']:14.2f} {r['ratio_of_medians']:15.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"benchmark": "divergence ratios", "machine": info, "shape": args.shape, "dtype": args.dtype,
                  "temperature": args.temperature, "runs": args.runs, "results": results}
        args.out.write_text(json.dumps(record, indent=1))
        print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
