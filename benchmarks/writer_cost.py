"""The shard writer's CPU cost (what it takes from the training cores), per way of hashing and
writing one shard.

    python benchmarks/writer_cost.py [--mib 32] [--rounds 7] [--dir DIR]

One shard buffer (default 32 MiB, the default shard size) is written to DIR (default: a temp dir
on the same disk as /tmp) as each variant does it, with fsync (waiting on the disk costs no
CPU, but it is part of a real write). The variants run interleaved, round by round; the table
shows the median CPU time of the writing thread (`time.thread_time`: copy into the page cache,
hashing, system calls) and the wall time.

* `sha256 after write, S slices`: the log format's sha256, updated after each write call of S
  bytes (hashlib releases the GIL for buffers over 2 KiB, so hashing never blocks training's
  Python thread; it still takes a core).
* `sha256 before write, S slices`: hash each slice first, so the write's copy reads it from cache.
* `crc32 after write, 8 MiB slices`: zlib.crc32, the shard checksum of the previous release
  (`logix.storage.format.atomic_write`); it also releases the GIL on large buffers.
* `blake2b` / `md5` / `no hash`: other digests and the floor (what a checksum costs at all).
* `write_shard, O_DIRECT, <digest>`: what the writer thread runs (`logix.storage.direct_io.
  write_direct`: page-aligned buffer, header padded to a page, O_DIRECT, fsync, rename) with
  each checksum; xxh3 is the one new shards record.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time

import torch

from logix.storage.format import new_digest

VARIANTS = {
    "write_shard, O_DIRECT, xxh3 (new shards)": ("xxh3", None, "direct"),
    "write_shard, O_DIRECT, crc32 (previous release)": ("crc32", None, "direct"),
    "write_shard, O_DIRECT, sha256": ("sha256", None, "direct"),
    "crc32 after write, 8 MiB slices": ("crc32", 8 << 20, "after"),
    "sha256 after write, 8 MiB slices (format 1)": ("sha256", 8 << 20, "after"),
    "sha256 after write, 1 MiB slices": ("sha256", 1 << 20, "after"),
    "sha256 before write, 1 MiB slices": ("sha256", 1 << 20, "before"),
    "sha256 before write, 256 KiB slices": ("sha256", 256 << 10, "before"),
    "sha256, one write of the whole shard": ("sha256", 1 << 40, "after"),
    "blake2b before write, 1 MiB slices": ("blake2b", 1 << 20, "before"),
    "md5 before write, 1 MiB slices": ("md5", 1 << 20, "before"),
    "no hash, 1 MiB slices (floor)": (None, 1 << 20, "after"),
}


def write(path: str, data: memoryview, algorithm, slice_bytes: int, order: str) -> None:
    if order == "direct":
        write_direct_shard(path, data, algorithm)
        return
    digest = None if algorithm is None else new_digest(algorithm) \
        if algorithm in ("crc32", "sha256", "xxh3") else hashlib.new(algorithm)
    with open(path, "wb") as f:
        for start in range(0, len(data), slice_bytes):
            piece = data[start:start + slice_bytes]
            if digest is not None and order == "before":
                digest.update(piece)
            f.write(piece)
            if digest is not None and order == "after":
                digest.update(piece)
        f.flush()
        os.fsync(f.fileno())
    os.remove(path)


def write_direct_shard(path: str, data: memoryview, algorithm: str) -> None:
    from logix.storage.direct_io import PAGE, write_direct
    from logix.storage.format import safetensors_header

    header = safetensors_header({"grad": (torch.float32, (len(data) // 4,))}, {}, align=PAGE)
    if write_direct(path, header, data, algorithm) is None:
        raise SystemExit(f"{os.path.dirname(path)} refuses O_DIRECT: pass --dir on another disk")
    os.remove(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args(argv)
    folder = args.dir or tempfile.mkdtemp(prefix="logix-writer-")
    from logix.storage.direct_io import aligned_empty

    rows = aligned_empty(args.mib << 18, 1, torch.float32)  # page-aligned, as the writer's
    rows.view(torch.uint8).copy_(torch.frombuffer(bytearray(os.urandom(args.mib << 20)),
                                                  dtype=torch.uint8).view(rows.shape[0], 4))
    data = memoryview(rows.numpy()).cast("B")
    samples = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    load = os.getloadavg()[0]
    for r in range(args.rounds + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:
            cpu, wall = time.thread_time(), time.perf_counter()
            write(os.path.join(folder, "shard.tmp"), data, *VARIANTS[name])
            if r:  # round 0 warms up
                samples[name].append((time.thread_time() - cpu, time.perf_counter() - wall))
    print(f"one {args.mib} MiB shard with fsync, median of {args.rounds} interleaved rounds; "
          f"load average at start {load:.2f}")
    print(f"{'variant':55s} {'CPU ms':>8s} {'wall ms':>8s} {'CPU GB/s':>9s}")
    for name, values in samples.items():
        cpu = statistics.median(v[0] for v in values)
        wall = statistics.median(v[1] for v in values)
        print(f"{name:55s} {cpu * 1e3:8.1f} {wall * 1e3:8.1f} {(args.mib << 20) / cpu / 1e9:9.2f}")


if __name__ == "__main__":
    main()
