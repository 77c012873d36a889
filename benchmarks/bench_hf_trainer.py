"""Step time and peak memory of ``DistillationTrainer`` against the naive KD ``Trainer`` people write.

Both are ``transformers.Trainer`` runs of the same student and teacher (small
random Llama configs with a large vocabulary), the same batches, optimiser
(AdamW) and loss ``hard_weight * CE + soft_weight * T^2 * KL(teacher || student)``
over the shifted target tokens:

* ``naive``: a ``Trainer`` subclass whose ``compute_loss`` is what people write:
  ``outputs = model(**inputs)`` (labels passed: the model's own cross-entropy),
  the teacher's ``logits`` under ``torch.no_grad()``, both shifted and masked
  (``labels != -100``), then ``F.kl_div(F.log_softmax(s / T), F.log_softmax(t / T),
  log_target=True, reduction="batchmean") * T**2``: both ``(tokens, vocab)``
  logits exist, with their log-softmaxes and the student's gradient;
* ``kdfast``: :class:`kdfast.integrations.transformers.DistillationTrainer`
  (trunks only; :func:`kdfast.fused_linear_distill_loss` on the two LM heads,
  chunked: no ``(tokens, vocab)`` tensor).

Time: one process, the two trainers in turns (``--rounds`` rounds of
``--steps`` timed optimizer steps each, after one untimed step per round), so
a machine that slows down slows both alike; the median step (forward,
backward and optimizer step, as ``on_step_begin`` / ``on_step_end`` see it) is
reported.  Peak memory: each method in a fresh subprocess (nothing of the
other method resident) runs two steps; before the second, kdfast's cached
gradient buffers are released (``kdfast.empty_cache()``), freed heap is
returned to the system and the resident high-water mark is reset; the peak is
``VmHWM`` after that step minus ``VmRSS`` before it (:mod:`kdfast.bench.memory`'s
method: every allocation counts).  On CUDA: ``max_memory_allocated`` minus the
allocation before the step.

    python benchmarks/bench_hf_trainer.py --quick    # V=8192, seq 128, batch 4, hidden 64/128
    python benchmarks/bench_hf_trainer.py            # V=49152, seq 512, batch 8, hidden 256/512, 2 layers

Results go to ``benchmarks/results/<device>-<date>-hf-trainer-<label>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import kdfast  # noqa: E402
from kdfast.bench.machine import describe_machine, machine_info  # noqa: E402
from kdfast.bench.memory import release_free_heap, status_kb  # noqa: E402

try:
    import transformers
except ImportError:  # pragma: no cover
    raise SystemExit("bench_hf_trainer.py needs transformers and accelerate: pip install kdfast[hf]")
from kdfast.integrations.transformers import DistillationConfig, DistillationTrainer  # noqa: E402

METHODS = ("naive", "kdfast")
# The acceptance targets (issue 18): kdfast's peak memory at most 25 % of the naive trainer's, its step time no worse.
MEMORY_TARGET = 0.25
TIME_TARGET = 1.0


@dataclass(frozen=True)
class Sizes:
    vocab: int
    seq_len: int
    batch: int
    student_hidden: int
    teacher_hidden: int
    layers: int

    @property
    def label(self) -> str:
        return (f"V{self.vocab}-T{self.seq_len}-B{self.batch}-H{self.student_hidden}-{self.teacher_hidden}"
                f"-L{self.layers}")


FULL = Sizes(vocab=49152, seq_len=512, batch=8, student_hidden=256, teacher_hidden=512, layers=2)
QUICK = Sizes(vocab=8192, seq_len=128, batch=4, student_hidden=64, teacher_hidden=128, layers=2)


# ----------------------------------------------------------------- models, data, trainers
def llama(hidden: int, sizes: Sizes, seed: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=sizes.vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=sizes.layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=sizes.seq_len, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).to(device)


def dataset(sizes: Sizes, examples: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, sizes.vocab, (examples, sizes.seq_len), generator=g)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


class NaiveKDTrainer(transformers.Trainer):
    """The KD ``compute_loss`` people write: both models' logits, ``F.kl_div`` of log-softmaxes, the model's CE."""

    def __init__(self, *args, teacher_model, temperature: float, hard_weight: float, soft_weight: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_model = teacher_model.eval().requires_grad_(False)
        self.temperature, self.hard_weight, self.soft_weight = temperature, hard_weight, soft_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)  # labels included: outputs.loss is the (shifted) cross-entropy
        with torch.no_grad():
            teacher_logits = self.teacher_model(input_ids=inputs["input_ids"],
                                                attention_mask=inputs.get("attention_mask")).logits
        labels = inputs["labels"][:, 1:]
        mask = labels != -100
        student = outputs.logits[:, :-1][mask]
        teacher = teacher_logits[:, :-1][mask]
        T = self.temperature
        kl = F.kl_div(F.log_softmax(student / T, dim=-1), F.log_softmax(teacher / T, dim=-1), log_target=True,
                      reduction="batchmean") * T ** 2
        loss = self.hard_weight * outputs.loss + self.soft_weight * kl
        return (loss, outputs) if return_outputs else loss


def make_trainer(method: str, sizes: Sizes, device: torch.device, steps: int, out_dir: str, callbacks=(),
                 models=None, settings=None):
    settings = settings or {}
    student, teacher = models or (llama(sizes.student_hidden, sizes, 0, device),
                                  llama(sizes.teacher_hidden, sizes, 1, device))
    args = transformers.TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=sizes.batch, max_steps=steps, learning_rate=1e-4,
        lr_scheduler_type="constant", logging_strategy="no", save_strategy="no", report_to=[],
        use_cpu=device.type == "cpu", disable_tqdm=True, dataloader_num_workers=0, seed=0)
    common = dict(model=student, args=args, train_dataset=dataset(sizes, sizes.batch * steps),
                  callbacks=list(callbacks))
    T, hard, soft = (settings.get(k, d) for k, d in (("temperature", 1.0), ("hard_weight", 0.5),
                                                      ("soft_weight", 0.5)))
    if method == "naive":
        trainer = NaiveKDTrainer(teacher_model=teacher, temperature=T, hard_weight=hard, soft_weight=soft, **common)
    elif method == "kdfast":
        config = DistillationConfig(divergence="kl", temperature=T, scale=T ** 2, hard_weight=hard, soft_weight=soft)
        trainer = DistillationTrainer(teacher_model=teacher, distillation_config=config, **common)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    trainer.remove_callback(transformers.PrinterCallback)  # no end-of-training metrics in the benchmark's output
    return trainer


# ----------------------------------------------------------------- time
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(transformers.TrainerCallback):
    """The seconds of every optimizer step but the first (optimizer state, first-call costs)."""

    def __init__(self, device: torch.device):
        self.device, self.times, self.started = device, [], None

    def on_step_begin(self, args, state, control, **kwargs):
        sync(self.device)
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync(self.device)
        if state.global_step > 1:
            self.times.append(time.perf_counter() - self.started)


def time_side_by_side(sizes: Sizes, device: torch.device, rounds: int, steps: int, settings: dict) -> dict:
    """Per method, the step times of ``rounds`` runs of ``steps`` timed steps, the methods taking turns."""
    models = {method: (llama(sizes.student_hidden, sizes, 0, device), llama(sizes.teacher_hidden, sizes, 1, device))
              for method in METHODS}
    times = {method: [] for method in METHODS}
    with tempfile.TemporaryDirectory() as out_dir:
        for r in range(rounds):
            order = METHODS if r % 2 == 0 else METHODS[::-1]
            for method in order:
                timer = StepTimer(device)
                trainer = make_trainer(method, sizes, device, steps + 1, out_dir, [timer], models[method], settings)
                trainer.train()
                times[method].extend(timer.times)
                print(f"  round {r + 1}/{rounds} {method:<6} " + " ".join(f"{t:.3f}" for t in timer.times) + " s",
                      flush=True)
                del trainer
                gc.collect()
    return times


def loss_agreement(sizes: Sizes, device: torch.device, settings: dict) -> dict:
    """The two trainers' loss on the same first batch from the same models (they compute one loss)."""
    with tempfile.TemporaryDirectory() as out_dir:
        values = {}
        for method in METHODS:
            trainer = make_trainer(method, sizes, device, 1, out_dir, settings=settings)
            batch = {k: v.to(device) for k, v in trainer.data_collator(trainer.train_dataset[:sizes.batch]).items()}
            with torch.no_grad():
                values[method] = float(trainer.compute_loss(trainer.model, batch))
            del trainer
            gc.collect()
    return {"loss": values, "relative_difference": abs(values["kdfast"] - values["naive"]) / abs(values["naive"])}


# ----------------------------------------------------------------- memory
class MemoryProbe(transformers.TrainerCallback):
    """Peak memory of the second optimizer step: VmHWM - VmRSS before (CPU), or CUDA's allocator peak."""

    def __init__(self, device: torch.device):
        self.device, self.before, self.result = device, None, {}

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step != 1:
            return
        kdfast.empty_cache()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return
        release_free_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return
        self.before = status_kb("VmRSS") * 1024

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != 2 or self.before is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = status_kb("VmHWM") * 1024
        self.result = {"peak_extra_bytes": max(0, peak - self.before), "peak_bytes": peak}


def child_memory(method: str, sizes: Sizes, device: torch.device, settings: dict) -> None:
    probe = MemoryProbe(device)
    with tempfile.TemporaryDirectory() as out_dir:
        make_trainer(method, sizes, device, 2, out_dir, [probe], settings=settings).train()
    print(json.dumps({"method": method, **probe.result}))


def memory_in_subprocess(method: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-memory", method, *_size_flags(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"  memory of {method} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------- driver
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"small sizes ({QUICK})")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    for name in ("vocab", "seq-len", "batch", "student-hidden", "teacher-hidden", "layers"):
        p.add_argument(f"--{name}", type=int, help="overrides the size of --quick / the default")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--hard-weight", type=float, default=0.5)
    p.add_argument("--soft-weight", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=3, help="rounds of the two trainers in turns")
    p.add_argument("--steps", type=int, default=2, help="timed optimizer steps per round (after one untimed)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--out", help="JSON path (default benchmarks/results/<device>-<date>-hf-trainer-<sizes>.json)")
    p.add_argument("--child-memory", choices=METHODS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve_sizes(args) -> Sizes:
    base = asdict(QUICK if args.quick else FULL)
    for key in base:
        value = getattr(args, key)
        if value is not None:
            base[key] = value
    return Sizes(**base)


def _size_flags(args) -> list:
    sizes = resolve_sizes(args)
    flags = ["--device", args.device, "--threads", str(args.threads), "--temperature", str(args.temperature),
             "--hard-weight", str(args.hard_weight), "--soft-weight", str(args.soft_weight)]
    for key, value in asdict(sizes).items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    sizes = resolve_sizes(args)
    settings = {"temperature": args.temperature, "hard_weight": args.hard_weight, "soft_weight": args.soft_weight}
    if args.child_memory:
        child_memory(args.child_memory, sizes, device, settings)
        return {}

    info = machine_info(device)
    print(f"machine: {describe_machine(info)}")
    print(f"sizes: {sizes} ({sizes.batch * sizes.seq_len} tokens a step); loss {settings['hard_weight']} * CE + "
          f"{settings['soft_weight']} * T^2 * KL, T={settings['temperature']}; AdamW, float32", flush=True)
    agreement = loss_agreement(sizes, device, settings)
    print(f"same loss: naive {agreement['loss']['naive']:.6f}, kdfast {agreement['loss']['kdfast']:.6f} "
          f"(relative difference {agreement['relative_difference']:.2e})", flush=True)
    times = time_side_by_side(sizes, device, args.rounds, args.steps, settings)
    memory = {method: {} if args.no_memory else memory_in_subprocess(method, args) for method in METHODS}
    memory_method = ("fresh subprocess per method: VmHWM - VmRSS before the second optimizer step, after "
                     "kdfast.empty_cache() and malloc_trim" if device.type == "cpu" else
                     "fresh subprocess per method: torch.cuda.max_memory_allocated - memory_allocated before the "
                     "second optimizer step")
    records = [{"method": method, "step_times_s": times[method], "median_step_s": statistics.median(times[method]),
                **memory[method]} for method in METHODS]
    summary = summarise(records)
    payload = {"benchmark": "bench_hf_trainer", "machine": info, "sizes": asdict(sizes), "settings": settings,
               "memory_method": memory_method, "agreement": agreement, "records": records, "summary": summary,
               "finished": _dt.datetime.now().isoformat(timespec="seconds")}
    print_table(records, summary, memory_method)
    out = Path(args.out) if args.out else (ROOT / "benchmarks" / "results" /
                                           f"{device.type}-{_dt.date.today()}-hf-trainer-{sizes.label}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return payload


def summarise(records: list) -> dict:
    by = {r["method"]: r for r in records}
    ours, theirs = by["kdfast"], by["naive"]
    summary = {"time_vs_naive": ours["median_step_s"] / theirs["median_step_s"]}
    if ours.get("peak_extra_bytes") is not None and theirs.get("peak_extra_bytes"):
        summary["memory_vs_naive"] = ours["peak_extra_bytes"] / theirs["peak_extra_bytes"]
        summary[f"target_memory_at_most_{MEMORY_TARGET:.0%}_of_naive"] = summary["memory_vs_naive"] <= MEMORY_TARGET
    summary["target_time_no_worse_than_naive"] = summary["time_vs_naive"] <= TIME_TARGET
    return summary


def print_table(records: list, summary: dict, memory_method: str) -> None:
    print(f"peak memory: {memory_method}")
    print(f"{'method':<8} {'median step s':>14} {'min s':>8} {'peak extra MiB':>15} {'peak RSS MiB':>13}")
    for r in records:
        extra = "-" if r.get("peak_extra_bytes") is None else f"{r['peak_extra_bytes'] / 2**20:.0f}"
        peak = "-" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**20:.0f}"
        print(f"{r['method']:<8} {r['median_step_s']:>14.3f} {min(r['step_times_s']):>8.3f} {extra:>15} {peak:>13}")
    for key, value in summary.items():
        print(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}")


if __name__ == "__main__":
    main()
