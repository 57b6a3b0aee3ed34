"""Shared helpers for the benchmarks: models, timing under a noisy machine, subprocess workers,
peak memory and plain-text tables.

Only the standard library is imported at module level: this file is also imported by workers
that run under another interpreter (for example the original LogIX 0.1.1 venv), which must pick
up *their* `logix`, not this checkout's.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

RESULT_MARK = "@@BENCH_RESULT@@"
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ----------------------------------------------------------------------------- models
def make_mlp(width: int = 512, depth: int = 4, classes: int = 10, seed: int = 0):
    """`depth` tracked width x width layers (model.body) and an untracked classifier head.

    With width 512, depth 4 and LoGra rank 32 a logged row holds 4 x 32 x 32 = 4096 numbers.
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            layers = []
            for _ in range(depth):
                layers += [nn.Linear(width, width), nn.ReLU()]
            self.body = nn.Sequential(*layers)
            self.head = nn.Linear(width, classes)

        def forward(self, x):
            return self.head(self.body(x))

    return MLP()


def make_gpt2(n_layer: int = 4, n_embd: int = 256, n_head: int = 4, n_positions: int = 128,
              vocab_size: int = 1000, seed: int = 0):
    """Tiny GPT2LMHeadModel, eager attention, dropout off (vmap(grad) needs no randomness, and
    both arms of a comparison must do the same work)."""
    import logging

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                     vocab_size=vocab_size, attn_implementation="eager", resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def mlp_loss(model, x, y):
    import torch.nn.functional as F

    return F.cross_entropy(model(x), y, reduction="sum")


def gpt2_loss(model, ids, _unused=None):
    """Next-token loss summed over tokens and examples. position_ids are passed as [B, T]: GPT-2
    builds them as [1, T] otherwise, and LogIX needs dim 0 of every tracked input to be the
    example axis (the wpe embedding would see a batch of 1)."""
    import torch
    import torch.nn.functional as F

    b, t = ids.shape
    pos = torch.arange(t, device=ids.device).expand(b, t)
    logits = model(ids, position_ids=pos).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           ids[:, 1:].reshape(-1), reduction="sum")


# ----------------------------------------------------------------------------- machine
def set_threads(threads: Optional[int]) -> None:
    import torch

    if threads:
        torch.set_num_threads(int(threads))


def apply_priority(nice: Optional[int]) -> str:
    """Raise this worker's CPU priority on a shared machine (needs root). Linux groups processes
    per session (autogroup) and shares the CPU fairly between groups before nice values count,
    so the worker runs in its own session (the parent starts it so) and sets both the group's
    and its own nice. Returns what was applied."""
    if not nice:
        return "none"
    done = []
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(int(nice)))
        done.append(f"autogroup nice {nice}")
    except OSError:
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, 0, int(nice))
        done.append(f"nice {nice}")
    except (OSError, AttributeError):
        pass
    return ", ".join(done) or "not permitted"


def peak_rss_mb() -> float:
    """Peak resident set of this process (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_busy_jiffies() -> Optional[int]:
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal ...
    return fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + (fields[7] if len(fields) > 7 else 0)


def external_load(window: float = 0.25) -> Optional[float]:
    """Cores kept busy by other processes (and the kernel) while this process sleeps."""
    a, c0 = _cpu_busy_jiffies(), time.process_time()
    if a is None:
        return None
    time.sleep(window)
    b, c1 = _cpu_busy_jiffies(), time.process_time()
    return max(0.0, (b - a) / _CLK_TCK - (c1 - c0)) / window


def quiesce(max_wait: float = 5.0, threshold: float = 0.3, sync: bool = True) -> Optional[float]:
    """Collect garbage, flush dirty pages of earlier epochs (so one epoch's writeback does not
    land in the next one's timing), then wait up to `max_wait` s for other processes to calm
    down. Returns the last measured external load (cores)."""
    gc.collect()
    if sync and hasattr(os, "sync"):
        os.sync()
    deadline = time.perf_counter() + max_wait
    load = external_load()
    while load is not None and load > threshold and time.perf_counter() < deadline:
        load = external_load()
    return load


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


class Measure:
    """Wall time, CPU time of this process (all its threads), other processes' CPU use, and
    the peak resident set during the block (sampled every 20 ms by a small thread)."""

    def __init__(self, sample_rss: bool = True):
        self.sample_rss = sample_rss
        self.rss_peak = float("nan")

    def _sample(self):
        peak = current_rss_mb()
        while not self._stop.wait(0.02):
            peak = max(peak, current_rss_mb())
        self.rss_peak = max(peak, current_rss_mb())

    def __enter__(self):
        import threading

        if self.sample_rss:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._j0 = _cpu_busy_jiffies()
        self._w0, self._c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._w0
        self.cpu = time.process_time() - self._c0
        if self.sample_rss:
            self._stop.set()
            self._thread.join()
        j1 = _cpu_busy_jiffies()
        if self._j0 is None or j1 is None or self.wall <= 0:
            self.ext = None
        else:
            self.ext = max(0.0, (j1 - self._j0) / _CLK_TCK - self.cpu) / self.wall
        return False

    def as_dict(self) -> Dict[str, float]:
        return {"wall": self.wall, "cpu": self.cpu, "ext": self.ext, "rss_peak": self.rss_peak}


def rotate(items: Sequence, r: int) -> List:
    """Round r's order: rotate, and reverse every other round, so no arm always goes first."""
    items = list(items)
    k = r % len(items)
    order = items[k:] + items[:k]
    return order[::-1] if (r // len(items)) % 2 else order


def interleaved(arms: Sequence[str], do: Callable[[str], dict], rounds: int,
                max_time: float = 0.0, clean_ext: float = 0.25):
    """Run rounds of every arm (order rotating) until `rounds` *clean* rounds -- no arm saw more
    than `clean_ext` cores of other processes' load -- or, after at least `rounds` rounds, until
    `max_time` seconds are spent (at most 4 x rounds). Returns ({arm: [result...]}, [clean...])."""
    results = {a: [] for a in arms}
    clean: List[bool] = []
    t0 = time.perf_counter()
    r = 0
    while True:
        got = {a: do(a) for a in rotate(arms, r)}
        for a in arms:
            results[a].append(got[a])
        clean.append(all(g.get("ext") is not None and g["ext"] <= clean_ext for g in got.values()))
        r += 1
        if sum(clean) >= rounds or r >= 4 * rounds:
            break
        if r >= rounds and time.perf_counter() - t0 > max_time:
            break
    return results, clean


def pick(results: Dict[str, list], clean: Sequence[bool]) -> Dict[str, list]:
    """The clean rounds when there are any, else all rounds."""
    if any(clean):
        return {a: [x for x, c in zip(v, clean) if c] for a, v in results.items()}
    return results


def median(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def dir_bytes(path: str, suffix: str = "") -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            if name.endswith(suffix):
                total += os.path.getsize(os.path.join(root, name))
    return total


# ----------------------------------------------------------------------------- workers
def emit(result: dict) -> None:
    """A worker's last act: print its JSON result behind a marker the parent looks for."""
    sys.stdout.flush()
    print(RESULT_MARK + json.dumps(result), flush=True)


def run_worker(python: str, script: str, worker: str, params: dict, cwd: Optional[str] = None,
               timeout: float = 3600, env: Optional[dict] = None, echo: bool = False) -> dict:
    """Run `python script --worker NAME --params JSON` in a fresh process (its own peak RSS and,
    with params["nice"], its own session so that apply_priority can take effect)."""
    cmd = [python, script, "--worker", worker, "--params", json.dumps(params)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, start_new_session=bool(params.get("nice")))
    if echo:
        sys.stderr.write(proc.stderr)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = "\n".join((proc.stdout + "\n" + proc.stderr).strip().splitlines()[-25:])
    raise RuntimeError(f"worker {worker} failed (rc={proc.returncode}):\n{tail}")


# ----------------------------------------------------------------------------- output
def table(headers: Sequence[str], rows: Sequence[Sequence], title: str = "") -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "+".join("-" * (w + 2) for w in widths)
    out = []
    if title:
        out.append(title)
    out.append(" | ".join(c.ljust(w) for c, w in zip(cells[0], widths)))
    out.append(line)
    for r in cells[1:]:
        out.append(" | ".join(c.rjust(w) if _numeric(c) else c.ljust(w)
                              for c, w in zip(r, widths)))
    return "\n".join(out)


def _numeric(s: str) -> bool:
    s = s.replace("x", "").replace("%", "").replace(",", "").strip()
    try:
        float(s.split()[0]) if s else None
        return bool(s)
    except ValueError:
        return False


def fmt(x: Optional[float], digits: int = 3) -> str:
    if x is None or x != x:
        return "n/a"
    return f"{x:.{digits}f}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024.0
    return f"{n:.1f} TiB"


def timed(fn: Callable, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def best_of(fn: Callable, repeats: int = 3) -> float:
    """The fastest of `repeats` timed calls of fn(), in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
