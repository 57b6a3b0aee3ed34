"""What a run's statistics and buffered rows will take in memory, checked before any is allocated.

Per watched layer with ranks (r_in, r_out), in float32: forward covariance r_in^2, backward
covariance r_out^2, grad covariance (r_in r_out)^2 numbers; plus one shard of buffered rows
(rows per shard x row width, in the log dtype). `run.watch`, `add_lora` and `setup` refuse a total
above `logging.max_statistics_bytes` and warn above a lower threshold.
"""

from __future__ import annotations

import os
import warnings
from typing import List, Sequence, Tuple

import torch

from logix.errors import ConfigError

_FRACTION = 0.5  # default budget: this share of the memory where statistics live
_WARN_BYTES = 1 << 28  # warn above 256 MiB (or a quarter of the budget, if smaller)

_SMALLER = "call run.add_lora() (or pass a smaller rank)"
_FIXES = {
    "grad": f"{_SMALLER}, or drop 'covariance' from setup()'s 'grad'",
    "forward": f"{_SMALLER}, or leave the layer out of run.watch(model, name_filter=...)",
    "backward": f"{_SMALLER}, or leave the layer out of run.watch(model, name_filter=...)",
    "rows": "lower logging.shard_rows (or logging.flush_threshold), or call run.add_lora()",
}


def default_budget(device: torch.device) -> int:
    """Half of the GPU's memory for a CUDA device, else half of the machine's RAM."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * _FRACTION)


def sizes(entries: Sequence, spec, rows_per_shard: int, row_itemsize: int
          ) -> List[Tuple[int, str, str]]:
    """[(bytes, what, kind)] of each statistic the capture spec collects and of a shard of rows."""
    items = []
    for e in entries:
        if spec.forward_covariance:
            items.append((4 * e.rank_in**2, f"forward covariance of {e.name!r} "
                          f"({e.rank_in}x{e.rank_in})", "forward"))
        if spec.backward_covariance:
            items.append((4 * e.rank_out**2, f"backward covariance of {e.name!r} "
                          f"({e.rank_out}x{e.rank_out})", "backward"))
        if spec.grad_covariance:
            d = e.rank_in * e.rank_out
            items.append((4 * d * d, f"grad covariance of {e.name!r} ({d}x{d})", "grad"))
    width = sum(e.rank_in * e.rank_out for e in entries)
    items.append((rows_per_shard * width * row_itemsize,
                  f"one shard of rows ({rows_per_shard} rows x {width} numbers)", "rows"))
    return items


def check(items: List[Tuple[int, str, str]], budget: int) -> None:
    """Refuse (ConfigError) a total above `budget` bytes, naming the largest items and their
    fixes; warn above a lower threshold."""
    total = sum(size for size, _, _ in items)
    largest = sorted(items, key=lambda item: -item[0])[:3]
    named = "; ".join(f"{what}: {human(size)}" for size, what, _ in largest)
    if total > budget:
        fixes = "; ".join(dict.fromkeys(_FIXES[kind] for _, _, kind in largest))
        raise ConfigError(
            f"Statistics and buffered rows would take {human(total)}, above "
            f"logging.max_statistics_bytes = {human(budget)}. Largest: {named}. Fix: {fixes}; or "
            "raise logging.max_statistics_bytes if the memory is there.")
    if total > min(budget // 4, _WARN_BYTES):
        warnings.warn(f"Statistics and buffered rows will take {human(total)} (largest: "
                      f"{named}); {_FIXES[largest[0][2]]} to shrink them.")


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
