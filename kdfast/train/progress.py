"""An optional progress bar: tqdm when it is installed and wanted, otherwise nothing at all."""

from __future__ import annotations

from typing import Dict, Optional


class _NoBar:
    """Stands in for a tqdm bar when there is none."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, values: Dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, total: Optional[int], description: str):
    """A tqdm bar over ``total`` steps if ``enabled`` and tqdm is importable, else a silent stand-in."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: training is the same without a bar
        return _NoBar()
    return tqdm(total=total, desc=description, leave=False, dynamic_ncols=True)
