"""The C++ ops' gradient recycler (csrc/op_common.h, GradBufferCache).

Gradients of 8 MB and more are allocated on huge pages and, when autograd
frees them, kept for the next call of a similar size: the two most recently
freed, so that a process alternating between several sizes reuses the newest
ones (the recycler once kept the first two it was given, and a third size then
paid a fresh allocation on every call).  ``kdfast.empty_cache()`` releases what
is kept and says how many bytes that was, which is what these tests read: an
address comparison could not tell a reused buffer from a fresh one that the
allocator happened to place where the old one was.
"""

import os
import subprocess
import sys

import pytest
import torch

import kdfast
from conftest import logits

pytestmark = pytest.mark.skipif("cpu" not in kdfast.available_backends(), reason="the C++ extension is not built")

MiB = 1 << 20


def gradient_of(shape, seed=0):
    """The gradient buffer the op allocated (autograd.grad hands it out as it is: no copy, no accumulation)."""
    student = logits(shape, seed=seed).requires_grad_(True)
    loss = kdfast.distill_loss(student, logits(shape, seed=seed + 1), backend="cpu")
    (grad,) = torch.autograd.grad(loss, student)
    return grad


@pytest.fixture(autouse=True)
def empty_recycler():
    kdfast.empty_cache()
    yield
    kdfast.empty_cache()


def test_empty_cache_reports_nothing_when_nothing_is_kept():
    assert kdfast.empty_cache() == 0


def test_a_freed_gradient_of_8_mib_is_kept():
    grad = gradient_of((256, 8192))  # 8 MiB of float32
    assert kdfast.empty_cache() == 0  # still alive: not kept
    del grad
    assert kdfast.empty_cache() == 8 * MiB


def test_a_gradient_below_8_mib_is_left_to_the_allocator():
    gradient_of((255, 8192))  # freed on return
    assert kdfast.empty_cache() == 0


def test_the_two_most_recently_freed_sizes_are_kept():
    for rows in (256, 512, 1024):  # 8, 16 and 32 MiB, each freed before the next call
        gradient_of((rows, 8192))
    assert kdfast.empty_cache() == (16 + 32) * MiB


def test_a_kept_buffer_serves_the_next_call_of_its_size():
    gradient_of((512, 8192))  # 16 MiB, freed and kept
    gradient_of((1024, 8192))  # 32 MiB: does not fit in 16, allocated and kept
    grad = gradient_of((512, 8192))  # takes the 16 MiB one
    assert kdfast.empty_cache() == 32 * MiB  # only the 32 MiB buffer was left to release
    del grad
    assert kdfast.empty_cache() == 16 * MiB


def test_recycling_off_keeps_nothing():
    # KDFAST_GRAD_CACHE is read once per process: check it in a fresh one
    code = ("import torch, kdfast; s = torch.randn(256, 8192, requires_grad=True); "
            "g, = torch.autograd.grad(kdfast.distill_loss(s, torch.randn(256, 8192), backend='cpu'), s); "
            "del g; print(kdfast.empty_cache())")
    env = dict(os.environ, KDFAST_GRAD_CACHE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"
