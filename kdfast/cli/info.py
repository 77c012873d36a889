"""``kdfast info``: what kdfast runs on here (versions, backends, SIMD level, threads, CUDA, Triton)."""

from __future__ import annotations

import json

from ..experiments.environment import collect_info

LABELS = {
    "kdfast": "kdfast version",
    "torch": "torch version",
    "python": "python version",
    "backends_available": "backends available",
    "cpu_extension": "C++ CPU extension built",
    "cpu_capability": "CPU SIMD level",
    "cpu": "CPU",
    "cores": "usable CPU cores",
    "torch_threads": "torch threads",
    "cuda": "CUDA",
    "triton": "Triton",
}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "info", help="print versions, backends, SIMD level, threads, CUDA/Triton status",
        description="Print what kdfast runs on: its version and torch's, the loss backends that work here "
                    "(torch reference, fused C++ CPU kernels, Triton), the SIMD level the CPU kernels use, "
                    "the CPU, torch's thread count and whether CUDA and Triton are usable.",
        epilog="examples:\n  kdfast info\n  kdfast info --json > env.json",
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of aligned lines")


def format_info(values: dict) -> str:
    """Aligned ``label: value`` lines (lists joined with commas, booleans as yes/no)."""
    width = max(len(label) for label in LABELS.values())
    lines = []
    for key, label in LABELS.items():
        value = values[key]
        if isinstance(value, bool):
            value = "yes" if value else "no"
        elif isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value))
        lines.append(f"{label + ':':<{width + 1}} {value}")
    return "\n".join(lines)


def run(args, extra) -> int:
    values = collect_info()
    print(json.dumps(values, indent=2) if args.json else format_info(values))
    return 0
