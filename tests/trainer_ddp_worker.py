"""Two-rank DDP runs of kdfast's Hugging Face trainers for tests/test_trainer_ddp.py (gloo, CPU).

Run under torchrun::

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/trainer_ddp_worker.py {trainer,gkd,trunk-outside-ddp} OUT

``trainer``: :class:`kdfast.integrations.transformers.DistillationTrainer` (a tiny
Llama student, a larger sharper Llama teacher) for two SGD steps over a dataset
of 4 sequences, 2 per rank per step, the target tokens spread unevenly over the
sequences; ``gkd``: kdfast's TRL ``GKDTrainer`` (``lmbda=0``: no generation, the
loss on the dataset's completions) the same way; ``trunk-outside-ddp``: the
first with the trunk called outside the DDP wrapper (the negative control).  Rank 0 saves
``OUT/<mode>.pt``: the student's parameters after the steps, the logged
history, and the trainer's DDP wrapper class (the test checks DDP was on).  The
test runs the same training in one process with 4 sequences per step.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

STEPS = 2


def distillation_run(out_dir: str, per_device: int, world: int):
    """The student's final parameters and log history after ``STEPS`` steps of DistillationTrainer."""
    from test_integrations_transformers import TokenDataset, llama, training_args

    from kdfast.integrations.transformers import DistillationConfig, DistillationTrainer

    from pathlib import Path

    student, teacher = llama(), llama(hidden=48, seed=1, head_scale=20.0)
    args = training_args(Path(out_dir), per_device_train_batch_size=per_device, max_steps=STEPS, optim="sgd",
                         learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
                         ddp_backend="gloo" if world > 1 else None)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=TokenDataset(4),
                                  distillation_config=DistillationConfig(temperature=2.0, hard_weight=0.5,
                                                                         soft_weight=0.5))
    trainer.train()
    return trainer, student


def gkd_run(out_dir: str, per_device: int, world: int):
    """The same for kdfast's TRL GKDTrainer at ``lmbda = 0`` (the dataset's completions, no generation)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from test_integrations_trl import dataset, gkd_config, llama, tokenizer

        from kdfast.integrations.trl import GKDTrainer
    from pathlib import Path

    tok = tokenizer()
    student, teacher = llama(), llama(seed=1, head_scale=20.0)
    config = gkd_config(Path(out_dir), per_device_train_batch_size=per_device, max_steps=STEPS, lmbda=0.0,
                        optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0,
                        weight_decay=0.0, ddp_backend="gloo" if world > 1 else None)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset(tok, n=4),
                         processing_class=tok)
    trainer.train()
    return trainer, student


def trunk_outside_ddp_run(out_dir: str, per_device: int, world: int):
    """DistillationTrainer with the student's trunk called directly, outside the DDP wrapper (the pitfall): the
    negative control, showing that the comparison can fail."""
    import kdfast.integrations.transformers as integration

    integration.student_hidden_states = lambda model, parts, inputs: parts.hidden_states(inputs)
    return distillation_run(out_dir, per_device, world)


RUNS = {"trainer": distillation_run, "gkd": gkd_run, "trunk-outside-ddp": trunk_outside_ddp_run}


def result(trainer, student) -> dict:
    return {"params": {name: p.detach().clone() for name, p in student.named_parameters()},
            "log_history": trainer.state.log_history,
            "wrapper": type(trainer.model_wrapped).__name__}


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    trainer, student = RUNS[mode](os.path.join(out, f"{mode}-work"), 4 // world, world)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(result(trainer, student), os.path.join(out, f"{mode}.pt"))
    # Every collective is done and the result saved.  Leaving through the interpreter's teardown
    # sometimes aborted rank 0 (std::terminate on a still-joinable gloo thread, SIGABRT) after a finished
    # run; skip that teardown.  (Ending the process group here instead made some launches hang.)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
