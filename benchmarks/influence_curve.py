"""Streamed influence against the in-memory matmul roofline, over query counts and log sizes.

    python benchmarks/influence_curve.py [--rows 16384,65536,262144] [--queries 1,16,256,4096]
        [--curve-rows 65536] [--dtype bfloat16] [--plot DIR] [--json out.json]

The log is written directly as shards (random rows through the run's shard writer, no training),
in the layout of the 4 x 512 MLP with LoGra rank 32 (4,096 numbers per row), stored in
`--dtype`. For each (rows, queries) point:

* roofline: `queries @ rows.T` in float32 with the rows resident in memory (a block of at most
  65,536 rows, timed and scaled: a GEMM's rate does not depend on the row count beyond that);
* streamed: `Attributor.compute_influence_all(hessian="none")`, full matrix and top-10, with the
  shards in the page cache (a first pass warms it and does the once-per-process checksum check);
* peak anonymous RSS during the timed passes (the roofline's block and product are allocated
  before sampling starts), beside the block budget (`block_rows` x dim x 4 bytes).

pairs/s = rows x queries / seconds. The arms run interleaved, `--repeats` times, best of each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import logix  # noqa: E402
from benchmarks._common import best_of  # noqa: E402  (the same module influence_throughput uses)
from benchmarks.influence_throughput import make_model, peak_sampler  # noqa: E402
from logix.log import StepRows  # noqa: E402

ROOFLINE_ROWS = 65536


def write_log(root: str, rows: int, dtype: str, chunk: int = 8192):
    """A project of `rows` random rows written straight through the shard writer."""
    run = logix.init("curve", root_dir=root, rank=32, log_dtype=dtype, seed=0)
    run.watch(make_model())
    run.add_lora()
    session = run._session
    run._open_session()
    g = torch.Generator().manual_seed(0)
    dim = sum(p.dim for p in run.projections.values())
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        session.writer.append(list(range(start, start + n)), torch.randn(n, dim, generator=g))
    run.finalize()
    return run


def queries(run, n: int) -> StepRows:
    g = torch.Generator().manual_seed(1)
    dim = sum(p.dim for p in run.projections.values())
    return StepRows([f"q{i}" for i in range(n)], torch.randn(n, dim, generator=g), run.layout(),
                   dict(run.projection_meta))


def measure(rows_list, query_list, curve_rows, dtype, repeats, block_rows) -> list:
    points = []
    root = tempfile.mkdtemp(prefix="logix-curve-")
    try:
        for n_rows in rows_list:
            t0 = time.perf_counter()
            run = write_log(root, n_rows, dtype)
            written = time.perf_counter() - t0
            attributor = logix.Attributor(run.project_dir)
            counts = query_list if n_rows == curve_rows else [256]
            for nq in counts:
                q = queries(run, nq)
                kw = dict(hessian="none", progress=False, block_rows=block_rows)
                first = best_of(lambda: attributor.compute_influence_all(q, topk=10, **kw), 1)
                block = torch.randn(min(n_rows, ROOFLINE_ROWS), q.grads.shape[1])
                product = torch.empty(nq, block.shape[0])
                arms = {"roofline": (block.shape[0],
                                     lambda: torch.matmul(q.grads, block.T, out=product)),
                        "topk": (n_rows, lambda: attributor.compute_influence_all(
                            q, topk=10, **kw))}
                if n_rows * nq * 4 <= 2 << 30:  # the full matrix stays under 2 GiB
                    arms["full"] = (n_rows, lambda: attributor.compute_influence_all(q, **kw))
                seconds = {arm: [] for arm in arms}
                stop, peaks = peak_sampler()
                for _ in range(repeats):  # interleaved: the machine's load hits every arm
                    for arm, (_, fn) in arms.items():
                        seconds[arm].append(best_of(fn, 1))
                stop.set()
                time.sleep(0.02)
                point = {"rows": n_rows, "queries": nq, "dtype": dtype, "write_s": written,
                         "first_pass_s": first, "load": os.getloadavg()[0],
                         "peak_anon_MiB": peaks["RssAnon_MB"],
                         "block_MiB": block_rows * q.grads.shape[1] * 4 / 2**20}
                for arm, (rows, _) in arms.items():
                    point[arm] = rows * nq / min(seconds[arm])
                block = product = None  # free the roofline block before the next log
                points.append(point)
                print(json.dumps(point), flush=True)
            shutil.rmtree(run.project_dir)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return points


def plot(points, folder: str, curve_rows: int) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, label, fixed in (("queries", "queries", "rows"), ("rows", "logged rows", "queries")):
        sel = sorted((p for p in points if (p["rows"] == curve_rows if key == "queries"
                                            else p["queries"] == 256)), key=lambda p: p[key])
        if len(sel) < 2:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        xs = [p[key] for p in sel]
        ax.plot(xs, [p["roofline"] for p in sel], "k--", label="in-memory matmul (roofline)")
        ax.plot(xs, [p["topk"] for p in sel], "o-", label="streamed, top-10")
        full = [(p[key], p["full"]) for p in sel if "full" in p]
        if full:
            ax.plot(*zip(*full), "s-", label="streamed, full matrix")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("pairs / s")
        ax.set_title(f"influence throughput ({fixed} = {sel[0][fixed]:,}, {sel[0]['dtype']} "
                     "shards)", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        path = os.path.join(folder, f"influence_vs_{key}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="16384,65536,262144")
    ap.add_argument("--queries", default="1,4,16,64,256,1024,4096")
    ap.add_argument("--curve-rows", type=int, default=65536,
                    help="the log size at which every query count runs (others: 256 queries)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--block-rows", type=int, default=8192)
    ap.add_argument("--plot", default=None, help="folder for the PNG plots")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows_list = [int(r) for r in args.rows.split(",")]
    if args.curve_rows not in rows_list:
        rows_list = sorted(rows_list + [args.curve_rows])
    load = os.getloadavg()
    print(f"torch threads {torch.get_num_threads()}, load average {load[0]:.2f}", flush=True)
    points = measure(rows_list, [int(q) for q in args.queries.split(",")], args.curve_rows,
                     args.dtype, args.repeats, args.block_rows)
    print(f"\n{'rows':>9s} {'queries':>7s} {'roofline':>10s} {'full':>10s} {'x roof':>6s} "
          f"{'top-10':>10s} {'x roof':>6s} {'peak anon MiB':>13s} {'block MiB':>9s}")
    for p in points:
        full = p.get("full")
        print(f"{p['rows']:9d} {p['queries']:7d} {p['roofline']:10.3e} "
              f"{full if full else float('nan'):10.3e} "
              f"{(full or float('nan')) / p['roofline']:6.2f} {p['topk']:10.3e} "
              f"{p['topk'] / p['roofline']:6.2f} {p['peak_anon_MiB']:13.0f} {p['block_MiB']:9.0f}")
    if args.plot:
        os.makedirs(args.plot, exist_ok=True)
        print("plots:", plot(points, args.plot, args.curve_rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load": load, "args": vars(args), "points": points}, f, indent=1)


if __name__ == "__main__":
    main()
