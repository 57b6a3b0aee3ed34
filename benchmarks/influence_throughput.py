"""Influence throughput: (train, test) pairs per second, side by side with the matmul roofline
and with a naive loader, plus peak memory when the logs are several times the block budget.

    python benchmarks/influence_throughput.py [--train 20000] [--queries 256] [--rank 32]

Setup (from the influence issue): a 4-layer 512-wide MLP, LoGra rank 32 (4 x 1024 = 4096 numbers
per example), 20,000 logged examples, 256 queries, logs in the page cache.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import logix  # noqa: E402
from _common import best_of  # noqa: E402
from logix.storage import reader as reader_module  # noqa: E402
from logix.storage.reader import LogReader  # noqa: E402


def make_model(width: int = 512, depth: int = 4, classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, width))  # 4 tracked 512x512 layers


def write_logs(root: str, n_train: int, rank: int, log_dtype: str = "float32"):
    model = make_model()
    run = logix.init("throughput", root_dir=root, rank=rank, log_dtype=log_dtype)
    run.watch(model)
    run.add_lora()
    run.setup({"grad": ["log"]})
    run.save(True)
    g = torch.Generator().manual_seed(1)
    for start in range(0, n_train, 256):
        n = min(256, n_train - start)
        x, y = torch.randn(n, 512, generator=g), torch.randint(0, 512, (n,), generator=g)
        with run(data_id=list(range(start, start + n))):
            F.cross_entropy(model(x), y, reduction="sum").backward()
    run.finalize()
    return run, model


def query_log(run, model, n_queries: int):
    run.eval()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(n_queries, 512, generator=g), torch.randint(0, 512, (n_queries,), generator=g)
    with run(data_id=[f"q{i}" for i in range(n_queries)]):
        F.cross_entropy(model(x), y, reduction="sum").backward()
    return run.get_log(copy=True)


def roofline_seconds(reader: LogReader, queries) -> float:
    """A plain torch.matmul of the same shapes with every row in memory (this also warms the
    page cache for the streaming arms)."""
    _, train = reader.read_all()
    return best_of(lambda: queries @ train.T)


def naive_pairs_per_second(reader: LogReader, test, limit: int) -> float:
    """The naive design: one example at a time, as nested per-module dicts, scored per module."""
    modules = reader.manifest.modules
    queries = {m.name: test.grads[:, m.columns].reshape(-1, m.rank_out, m.rank_in)
               for m in modules}

    def run_naive():
        seen = 0
        for _, block in reader.blocks(256):
            for row in block:
                example = {m.name: {"grad": row[m.columns].reshape(m.rank_out, m.rank_in).clone()}
                           for m in modules}
                score = torch.zeros(len(test))
                for name, entry in example.items():
                    score += (queries[name] * entry["grad"]).sum((1, 2))
                seen += 1
                if seen >= limit:
                    return

    return limit * len(test) / best_of(run_naive, 1)


def verification_cost(reader: LogReader) -> dict:
    """MB/s of the first-read checksum check of every shard against a plain read of the same bytes
    (page cache warm for both), and the cost of a cached check."""
    paths = [(os.path.join(reader.project_dir, s.file), s) for s in reader.shards]
    size = sum(s.bytes for _, s in paths) / 1e6

    def plain():
        for path, _ in paths:
            with open(path, "rb") as f:
                while f.read(1 << 20):
                    pass

    def verify():
        reader_module._verified.clear()
        for path, shard in paths:
            reader_module.verify_shard(path, shard)

    plain_s, verify_s = best_of(plain), best_of(verify)
    start = time.perf_counter()
    for path, shard in paths:  # cached: a stat per shard
        reader_module.verify_shard(path, shard)
    cached_s = time.perf_counter() - start
    return {"MB": size, "plain_MBps": size / plain_s, "verify_MBps": size / verify_s,
            "cached_ms": cached_s * 1e3}


def memory_probe(root: str, block_rows: int) -> dict:
    """Peak anonymous and file-backed resident memory of a scoring pass, in a fresh process."""
    code = f"""
import json, threading, time, torch, logix
from benchmarks.influence_throughput import make_model, query_log, peak_sampler
run = logix.init("throughput", root_dir={root!r})
model = make_model()
run.watch(model); run.initialize_from_log()
test = query_log(run, model, 256)
stop, peaks = peak_sampler()
run.compute_influence_all(test, hessian="none", block_rows={block_rows}, topk=10, progress=False)
stop.set(); time.sleep(0.05)
print(json.dumps(peaks))
"""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_sampler():
    """Sample RssAnon / RssFile from /proc every 5 ms until the event is set."""
    peaks = {"RssAnon_MB": 0.0, "RssFile_MB": 0.0}
    stop = threading.Event()
    base = _rss()

    def sample():
        while not stop.is_set():
            now = _rss()
            for key in peaks:
                peaks[key] = max(peaks[key], now[key] - base[key])
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    return stop, peaks


def _rss() -> dict:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                values[f"{key}_MB"] = int(rest.split()[0]) / 1024
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--naive-limit", type=int, default=400)
    args = parser.parse_args()

    root = tempfile.mkdtemp(prefix="logix-throughput-")
    t0 = time.perf_counter()
    run, model = write_logs(root, args.train, args.rank)
    test = query_log(run, model, args.queries)
    reader = run.reader()
    print(f"logged {reader.rows} rows x {reader.dim} numbers in {time.perf_counter() - t0:.1f}s "
          f"({sum(s.bytes for s in reader.manifest.shards) / 2**20:.0f} MiB on disk); "
          f"{args.queries} queries; torch threads {torch.get_num_threads()}")
    pairs = args.train * args.queries

    roofline = pairs / roofline_seconds(reader, test.grads.float())

    rows = []
    for hessian in ("none",):
        for label, kwargs in (("full matrix", {}), ("top-10", {"topk": 10})):
            seconds = best_of(lambda: run.compute_influence_all(
                test, hessian=hessian, progress=False, **kwargs))
            rows.append((f"LogIX stream ({label})", pairs / seconds))
    naive = naive_pairs_per_second(reader, test, args.naive_limit)
    rows.append(("naive per-example dict loader", naive))

    print(f"\n{'method':38s} {'pairs/s':>12s} {'vs roofline':>12s} {'vs naive':>10s}")
    print(f"{'torch.matmul in memory (roofline)':38s} {roofline:12.3e} {1.0:12.2f} "
          f"{roofline / naive:10.1f}")
    for name, value in rows:
        print(f"{name:38s} {value:12.3e} {value / roofline:12.2f} {value / naive:10.1f}")

    cost = verification_cost(reader)
    print(f"\nshard verification ({cost['MB']:.0f} MB): checksum {cost['verify_MBps']:.0f} MB/s vs "
          f"plain read {cost['plain_MBps']:.0f} MB/s, once per process; cached check "
          f"{cost['cached_ms']:.2f} ms for {len(reader.shards)} shards")

    block_rows = 2048
    log_bytes = reader.rows * reader.dim * 4
    block_bytes = block_rows * reader.dim * 4
    peaks = memory_probe(root, block_rows)
    print(f"\nmemory: log {log_bytes / 2**20:.0f} MiB, block budget {block_bytes / 2**20:.0f} MiB "
          f"({log_bytes / block_bytes:.1f}x); scoring pass peak: anonymous "
          f"+{peaks['RssAnon_MB']:.0f} MiB, file-backed (reclaimable page cache) "
          f"+{peaks['RssFile_MB']:.0f} MiB")


if __name__ == "__main__":
    main()
