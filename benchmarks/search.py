"""Vector search: recall@10 and latency of `Attributor.search` (index candidates, exact
re-ranking) against the exact streaming top-k (`compute_influence_all(topk=10)`).

    python benchmarks/search.py [--rows 1000000] [--dim 1024] [--wide-rows 100000]
                                [--wide-dim 8192] [--studies digits,synthetic,wide]
                                [--variants hnsw,ivf,ivf-sq8,flat] [--out DIR] [--json FILE]
    python benchmarks/search.py --studies latency [--latency-rows 10000,100000,1000000]

Study "latency" (issue 29): kind="auto" on float32 logs of 928-wide rows (a 4x512 MLP at LoGra
rank 16) of each size: build with its calibration, the exact stream (best of 2 after an untimed
pass), warm searches (one process, one Attributor: median and min of 20 single queries, best of
3 batches of 64; wall and CPU time, and the split index / read / rerank) and a cold one (a new
process: import, open, one query; the OS page cache as the earlier phases left it). On a shared
machine read the ratios to the stream of the same run, the mins and the CPU times, with the load
printed.

Logs: (1) a synthetic log of --rows x --dim bfloat16 rows written as shards directly (rows from
a 64-dimensional latent with log-normal norms plus noise, so that neighbours are structured as
gradients are); 64 queries from the same distribution. (2) The real digits log of
examples/digits (LoGra rank 16, 1,500 training rows, 297 test queries, EK-FAC). (3) A wide
synthetic log (--wide-rows x --wide-dim) for recall against the JL sketch width. Each build and
query set runs in its own process, so peak RSS is per phase. Curvature: the synthetic logs have
no statistics (hessian "none"); a dot index serves every curvature, the query is preconditioned.
With --out DIR the logs, indexes and build results are kept there and reused by the next run
(the 10^6-row log takes minutes to write and each index minutes to build).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

K = 10
CANDIDATES = (20, 50, 100, 200, 400)
SHARD_ROWS = 65536
SYNTHETIC_VARIANTS = {"hnsw": {"kind": "hnsw", "sketch": 256, "ef": 40},  # efConstruction 40
                      "ivf": {"kind": "ivf", "sketch": 256},
                      "ivf-sq8": {"kind": "ivf", "sketch": 256, "quantize": "sq8"},
                      "flat": {"kind": "flat", "sketch": 256}}


# ----------------------------------------------------------------------------- data
def write_log(project_dir: str, rows: int, dim: int, seed: int, dtype: str = "bfloat16") -> None:
    """Shards of rows (bf16 or float32) and a manifest, as the writer lays them out."""
    import torch

    from logix.storage.format import (DATA_IDS_KEY, GRAD_KEY, LOGS_DIR, atomic_write,
                                      safetensors_header, shard_name, tensor_bytes)
    from logix.storage.manifest import Manifest, ModuleEntry, ShardEntry

    side = max(d for d in range(1, int(dim ** 0.5) + 1) if dim % d == 0)  # side x dim/side
    module = ModuleEntry("body", "Linear", 4096, 4096, side, dim // side, 0)
    torch_dtype = getattr(torch, dtype)
    manifest = Manifest(project=os.path.basename(project_dir), dtype=dtype,
                        modules=[module], projection={"init": "random", "seed": 0})
    os.makedirs(os.path.join(project_dir, LOGS_DIR), exist_ok=True)
    for seq, start in enumerate(range(0, rows, SHARD_ROWS)):
        n = min(SHARD_ROWS, rows - start)
        block = sample(n, dim, seed * 1_000_003 + seq).to(torch_dtype)
        ids = list(range(start, start + n))
        header = safetensors_header({GRAD_KEY: (torch_dtype, [n, dim])},
                                    {DATA_IDS_KEY: json.dumps(ids)})
        rel = os.path.join(LOGS_DIR, shard_name(0, seq))
        sha = atomic_write(os.path.join(project_dir, rel), header, tensor_bytes(block))
        manifest.shards.append(ShardEntry(rel, n, len(header) + n * dim * block.element_size(),
                                          sha, 0, seq))
    manifest.save(project_dir)


def sample(n: int, dim: int, seed: int):
    """[n, dim] rows: 1,000 clusters in a shared 64-dim latent space (as gradients group by
    class and prediction), log-normal norms, isotropic noise."""
    import torch

    basis = torch.randn(64, dim, generator=torch.Generator().manual_seed(7)) / 8
    centers = torch.randn(1000, 64, generator=torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(seed)
    cluster = torch.randint(0, 1000, (n,), generator=g)
    latent = centers[cluster] + 0.5 * torch.randn(n, 64, generator=g) * torch.linspace(2, 0.2, 64)
    scale = torch.exp(0.5 * torch.randn(n, 1, generator=g))
    return (latent @ basis + 0.3 * torch.randn(n, dim, generator=g) / dim ** 0.5 * 8) * scale


def queries(project_dir: str, n: int, dim: int):
    import torch

    from logix.log import StepRows
    from logix.storage.manifest import Manifest

    manifest = Manifest.load(project_dir)
    return StepRows([f"q{i}" for i in range(n)], sample(n, dim, 99).to(torch.bfloat16).float(),
                   manifest.modules, dict(manifest.projection))


# ----------------------------------------------------------------------------- workers
def worker_write(p: dict) -> dict:
    from logix.storage.manifest import Manifest

    if os.path.isfile(os.path.join(p["project"], "manifest.json")):
        manifest = Manifest.load(p["project"])
        if sum(s.rows for s in manifest.shards) == p["rows"] and manifest.dim == p["dim"]:
            return {"seconds": 0.0, "reused": True}
        shutil.rmtree(p["project"])
    started = time.perf_counter()
    write_log(p["project"], p["rows"], p["dim"], p["seed"], p.get("dtype", "bfloat16"))
    return {"seconds": time.perf_counter() - started}


def worker_build(p: dict) -> dict:
    import logix

    att = logix.Attributor(p["project"])
    started = time.perf_counter()
    m = att.build_index(p["kind"], sketch=p.get("sketch"), quantize=p.get("quantize"),
                        hessian=p.get("hessian"), progress=False, rebuild=True,
                        **{key: p[key] for key in ("ef",) if key in p})
    return {"name": m.name, "factory": m.faiss["factory"], "nlist": m.faiss["nlist"],
            "calibration": {k: v for k, v in (m.calibration or {}).items() if k != "positions"},
            "nprobe": m.faiss["nprobe"], "ef": m.faiss["ef"], "seconds":
            time.perf_counter() - started, "bytes": m.bytes, "rows": m.rows,
            "peak_rss_mb": _common.peak_rss_mb()}


def worker_exact(p: dict) -> dict:
    """The exact streaming top-k for batches of 1 and all queries (timed, best of `repeats`
    after one untimed pass that reads the shards into the page cache), and its ids."""
    import logix

    att = logix.Attributor(p["project"])
    q = load_queries(p)
    out = {"ids": None, "scores": None, "seconds": {}}
    att.compute_influence_all(subset(q, 1), hessian=p.get("hessian"), topk=K, progress=False)
    for batch in (1, len(q)):  # after an untimed pass: over shards in the page cache, as warm
        sub = subset(q, batch)
        times = []
        for _ in range(p.get("repeats", 1)):
            started = time.perf_counter()
            result = att.compute_influence_all(sub, hessian=p.get("hessian"), topk=K,
                                               progress=False)
            times.append(time.perf_counter() - started)
        out["seconds"][str(batch)] = min(times)
        if batch == len(q):
            out["ids"] = result["top_ids"]
            out["scores"] = result["top_scores"].tolist()
    out["peak_rss_mb"] = _common.peak_rss_mb()
    return out


def worker_search(p: dict) -> dict:
    """Recall@10 and latency per candidate count, batches of 1 and all queries."""
    import logix

    att = logix.Attributor(p["project"])
    q = load_queries(p)
    exact = p["exact_ids"]
    att.search(subset(q, 1), k=K, index=p["index"], hessian=p.get("hessian"))  # warm up
    rows = []
    for setting in p["settings"]:  # {"candidates": c[, "nprobe": n][, "ef": e]}
        entry = {"nprobe": p.get("nprobe"), "ef": p.get("ef"), **setting}
        for batch in (1, len(q)):
            sub = subset(q, batch)
            times = []
            for _ in range(3):
                started = time.perf_counter()
                result = att.search(sub, k=K, index=p["index"], hessian=p.get("hessian"),
                                    **setting)
                times.append(time.perf_counter() - started)
            entry[f"seconds_{batch}"] = min(times)
            if batch == len(q):
                entry["recall"] = sum(len(set(a) & set(b)) for a, b in
                                      zip(result["top_ids"], exact)) / (K * len(exact))
        rows.append(entry)
    return {"rows": rows, "peak_rss_mb": _common.peak_rss_mb()}


def worker_warm(p: dict) -> dict:
    """One process, one Attributor: the first search (opens everything), then warm searches of
    1 query (each of the first `singles` queries once) and of the whole batch (best of 3);
    recall@10 against the stream's ids and whether the scores are the stream's to round-off
    (and how many have its bits)."""
    import statistics as stats

    import torch

    import logix

    att = logix.Attributor(p["project"])
    q = load_queries(p)
    started = time.perf_counter()
    first = att.search(subset(q, 1), k=K, hessian="none")
    out = {"first_s": time.perf_counter() - started, "first_split": first["meta"]["search"]
           ["seconds"]}
    singles, splits, cpu = [], [], []
    for i in range(p.get("singles", 20)):
        one = subset(q, 1, start=i)
        started, cpu_started = time.perf_counter(), time.process_time()
        result = att.search(one, k=K, hessian="none")
        singles.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)  # CPU seconds, all threads: the load
        splits.append(result["meta"]["search"]["seconds"])  # on the 2 shared cores shows less
    out["cpu_1_median_s"] = stats.median(cpu)
    out["warm_1_median_s"], out["warm_1_p90_s"] = stats.median(singles), \
        sorted(singles)[int(0.9 * len(singles))]
    out["warm_1_min_s"] = min(singles)
    out["warm_1_split"] = splits[singles.index(stats.median_low(singles))]
    times, cpu = [], []
    for _ in range(3):
        started, cpu_started = time.perf_counter(), time.process_time()
        result = att.search(q, k=K, hessian="none")
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    out["cpu_batch_s"] = min(cpu)
    out["warm_batch_s"], out["warm_batch_split"] = min(times), result["meta"]["search"]["seconds"]
    out["batch_streamed"] = bool(result["meta"]["search"].get("stream"))  # exact flat index
    exact_ids, exact_scores = p["exact_ids"], torch.tensor(p["exact_scores"])
    out["recall"] = sum(len(set(a) & set(b)) for a, b in zip(result["top_ids"], exact_ids)) \
        / (K * len(exact_ids))
    close = same = total = 0  # a batch's scores: the stream's to float32 round-off
    tolerance = 1e-6 * float(exact_scores.abs().max())
    for qi, (got, want) in enumerate(zip(result["top_ids"], exact_ids)):
        for j, i in enumerate(got):
            if i in want:
                a, b = float(result["top_scores"][qi, j]), float(exact_scores[qi, want.index(i)])
                total += 1
                same += a == b
                close += abs(a - b) <= 1e-5 * abs(b) + tolerance
    out["stream_close"] = f"{close}/{total} ({same} bits)"
    out["paired"] = _paired(att, q, p.get("pairs", 5))
    out["peak_rss_mb"] = _common.peak_rss_mb()
    return out


def _paired(att, q, rounds: int) -> dict:
    """Search and stream timed alternately in this process, `rounds` times for 1 query (a
    different one each round) and for the batch: both under the same load and page cache (on a
    shared machine the stream's two threads slow far more than a one-thread search when the
    other core is busy, and a log larger than the cache the VM keeps is read from disk).
    {"1"|"batch": {"search": [s], "stream": [s]}}."""
    out = {}
    for name in ("1", "batch"):
        times = {"search": [], "stream": []}
        for r in range(rounds):
            src = q if name == "batch" else subset(q, 1, start=r % len(q))
            for how in ("search", "stream"):
                started = time.perf_counter()
                if how == "search":
                    att.search(src, k=K, hessian="none")
                else:
                    att.compute_influence_all(src, hessian="none", topk=K, progress=False)
                times[how].append(time.perf_counter() - started)
        out[name] = times
    return out


def worker_cold(p: dict) -> dict:
    """A new process answering one query: import, open, search (the process start included)."""
    import logix

    att = logix.Attributor(p["project"])
    q = load_queries(p)
    started = time.perf_counter()
    att.search(subset(q, 1), k=K, hessian="none")
    return {"search_s": time.perf_counter() - started}


def load_queries(p: dict):
    import logix.log

    if p.get("queries_file"):
        return logix.log.StepRows.load(p["queries_file"])
    return queries(p["project"], p["queries"], p["dim"])


def subset(q, n, start=0):
    from logix.log import StepRows

    part = slice(start, start + n)
    return StepRows(q.data_ids[part], q.grads[part], q.modules, q.projection)


def worker_digits(p: dict) -> dict:
    """Log the digits CNN (the real logging path) and save its 297 test queries."""
    from pathlib import Path

    import torch
    from torch.nn import functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "digits"))
    import digits

    data = digits.load_data()
    model = digits.train_model(data)
    run = digits.log_training(model, data, 16, Path(p["root"]))
    run.eval()
    with run(data_id=[f"test-{i}" for i in range(len(data.x_test))]):
        model.zero_grad()
        F.cross_entropy(model(data.x_test), data.y_test, reduction="sum").backward()
    run.get_log(copy=True).save(p["queries_file"])
    del torch
    return {"project": run.project_dir, "rows": run.reader().rows,
            "dim": run.reader().dim}


WORKERS = {"write": worker_write, "build": worker_build, "exact": worker_exact,
           "search": worker_search, "digits": worker_digits, "warm": worker_warm,
           "cold": worker_cold}


# ----------------------------------------------------------------------------- driver
def call(worker: str, params: dict) -> dict:
    result = _common.run_worker(sys.executable, os.path.abspath(__file__), worker, params,
                                timeout=3600, echo=True)
    shown = {k: v for k, v in result.items() if k not in ("ids", "scores")}
    print(f"  {worker}: {json.dumps(shown)[:600]}",
          file=sys.stderr, flush=True)
    return result


def study(name: str, params: dict, variants, candidates, report: dict, builds: dict) -> None:
    """`builds`: build results by project and variant, reused while the index is on disk."""
    exact = call("exact", params)
    entry = {"exact_seconds": exact["seconds"], "exact_peak_rss_mb": exact["peak_rss_mb"],
             "indexes": []}
    for variant in variants:
        key = json.dumps([params["project"], variant], sort_keys=True)
        built = builds.get(key)
        if built is None or not os.path.isdir(os.path.join(params["project"], "index",
                                                           built["name"])):
            built = builds[key] = call("build", {**params, **variant})
        settings = [{"candidates": c} for c in candidates]
        if built["nlist"]:  # IVF: lists probed
            settings += [{"candidates": c, "nprobe": max(1, built["nlist"] // d)}
                         for c in (50, 100) for d in (64, 32, 16, 8)]
        if built["ef"]:  # HNSW: search breadth
            settings += [{"candidates": c, "ef": ef} for c in (50, 100) for ef in (64, 256)]
        searched = call("search", {**params, "index": built["name"], "exact_ids": exact["ids"],
                                   "settings": settings, "nprobe": built["nprobe"],
                                   "ef": built["ef"]})
        entry["indexes"].append({**built, "search": searched["rows"],
                                 "search_peak_rss_mb": searched["peak_rss_mb"]})
    report[name] = entry


def latency(root: str, sizes, dim: int, n_queries: int, report: dict, reuse: bool) -> None:
    """kind="auto" on float32 logs of each size: build (with its calibration), the exact stream,
    warm searches in one process and a cold one in a new process. `reuse`: the build and the
    stream's timings and ids of an earlier run under the same --out."""
    rows_out = []
    for rows in sizes:
        project = os.path.join(root, f"lat-{rows}")
        call("write", {"project": project, "rows": rows, "dim": dim, "seed": 0,
                       "dtype": "float32"})
        params = {"project": project, "queries": n_queries, "dim": dim, "hessian": "none",
                  "repeats": 2}
        cache_file = os.path.join(project, "latency-cache.json")  # --out: reuse build, stream
        cached = json.load(open(cache_file)) if reuse and os.path.isfile(cache_file) else {}
        index_there = os.path.isdir(os.path.join(project, "index", "auto-dot"))
        built = cached["build"] if "build" in cached and index_there else \
            call("build", {**params, "kind": "auto"})
        exact = cached.get("exact") or call("exact", params)
        with open(cache_file, "w") as f:
            json.dump({"build": built, "exact": exact}, f)
        load = os.getloadavg()[0]
        started = time.perf_counter()
        cold = call("cold", params)
        cold_process = time.perf_counter() - started
        warm = call("warm", {**params, "exact_ids": exact["ids"], "exact_scores": exact["scores"]})
        rows_out.append({"rows": rows, "load": load, "build": built, "exact": exact["seconds"],
                         "cold_search_s": cold["search_s"], "cold_process_s": cold_process,
                         **warm})
    report["latency"] = rows_out


def print_latency(entries) -> None:
    table = []
    for e in entries:
        ex1, exb = e["exact"]["1"], e["exact"][max(e["exact"], key=int)]
        cal = e["build"]["calibration"]
        table.append([f"{e['rows']:,}", e["build"]["factory"], f"{e['build']['seconds']:.0f}",
                      f"{cal.get('recall_at_10', 1):.3f}", f"{e['recall']:.3f}",
                      e.get("stream_close", e.get("stream_bits")), f"{ex1 * 1e3:.0f}",
                      f"{e['warm_1_median_s'] * 1e3:.1f}", f"{ex1 / e['warm_1_median_s']:.0f}x",
                      f"{e['warm_1_min_s'] * 1e3:.1f}", f"{ex1 / e['warm_1_min_s']:.0f}x",
                      f"{e.get('cpu_1_median_s', float('nan')) * 1e3:.1f}",
                      f"{exb * 1e3:.0f}", f"{e['warm_batch_s'] * 1e3:.1f}"
                      + (" (stream)" if e.get("batch_streamed") else ""),
                      f"{exb / e['warm_batch_s']:.0f}x",
                      f"{e.get('cpu_batch_s', float('nan')) * 1e3:.0f}",
                      f"{e['cold_search_s'] * 1e3:.0f}",
                      f"{e['cold_process_s']:.1f}", f"{e['load']:.1f}"])
    print(_common.table(["rows", "auto picked", "build s", "built recall", "recall@10",
                         "stream to 1e-5", "exact 1q ms", "warm 1q ms", "x", "min 1q ms", "x",
                         "1q CPU ms",
                         "exact 64q ms", "warm 64q ms", "x", "64q CPU ms", "cold 1q ms",
                         "cold proc s", "load"], table))
    paired = []
    for e in entries:
        if "paired" not in e:
            continue
        row = [f"{e['rows']:,}"]
        for name in ("1", "batch"):
            search, stream = e["paired"][name]["search"], e["paired"][name]["stream"]
            row += [f"{1e3 * min(search):.1f} / {1e3 * min(stream):.0f}",
                    f"{min(stream) / min(search):.0f}x",
                    f"{statistics.median(stream) / statistics.median(search):.0f}x"]
        paired.append(row)
    if paired:
        print("\nsearch and stream alternated in the warm process (min ms; ratio of mins, of "
              "medians):")
        print(_common.table(["rows", "1q search / stream", "x min", "x median",
                             "64q search / stream", "x min", "x median"], paired))


def print_study(name: str, entry: dict) -> None:
    ex = entry["exact_seconds"]
    print(f"\n{name}: exact stream {ex['1']:.3f} s (1 query), "
          f"{ex[max(ex, key=int)]:.3f} s ({max(ex, key=int)} queries); "
          f"peak RSS {entry['exact_peak_rss_mb']:.0f} MB")
    rows = []
    batch = max(ex, key=int)
    for idx in entry["indexes"]:
        for r in idx["search"]:
            one, many = r["seconds_1"], r[f"seconds_{batch}"]
            rows.append([idx["name"], idx["factory"], r["candidates"], r["nprobe"] or "-",
                         r["ef"] or "-", f"{r['recall']:.3f}", f"{one * 1e3:.1f}", f"{ex['1'] / one:.0f}x",
                         f"{many * 1e3:.1f}", f"{ex[batch] / many:.0f}x"])
    print(_common.table(["index", "faiss", "cand.", "nprobe", "ef", "recall@10", "1 q ms",
                         "speedup",
                         "batch ms", "speedup"], rows))
    rows = [[i["name"], f"{i['seconds']:.1f}", _common.human_bytes(i["bytes"]),
             f"{i['bytes'] / i['rows']:.0f}", f"{i['peak_rss_mb']:.0f}",
             f"{i['search_peak_rss_mb']:.0f}"] for i in entry["indexes"]]
    print(_common.table(["index", "build s", "bytes", "bytes/row", "build RSS MB",
                         "search RSS MB"], rows))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--wide-rows", type=int, default=100_000)
    parser.add_argument("--wide-dim", type=int, default=8192)
    parser.add_argument("--studies", default="digits,synthetic,wide",
                        help="which logs to study, comma separated")
    parser.add_argument("--variants", default=",".join(SYNTHETIC_VARIANTS),
                        help="indexes of the synthetic study, comma separated")
    parser.add_argument("--out", default=None, help="keep and reuse logs, indexes and build "
                        "results here (default: a temp folder)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument("--latency-rows", default="10000,100000,1000000",
                        help="study 'latency': log sizes (float32, --latency-dim wide)")
    parser.add_argument("--latency-dim", type=int, default=928,
                        help="row width of the latency study (928: a 4x512 MLP, LoGra rank 16)")
    parser.add_argument("--reuse", action="store_true",
                        help="latency: reuse the build and the stream of an earlier run in --out")
    parser.add_argument("--worker")
    parser.add_argument("--params")
    args = parser.parse_args(argv)
    if args.worker:
        _common.emit(WORKERS[args.worker](json.loads(args.params)))
        return 0

    root = args.out or tempfile.mkdtemp(prefix="logix-search-")
    builds_file = os.path.join(root, "builds.json")
    builds = json.load(open(builds_file)) if os.path.isfile(builds_file) else {}
    report = {}
    try:
        studies = args.studies.split(",")
        if "latency" in studies:
            latency(root, [int(r) for r in args.latency_rows.split(",")], args.latency_dim,
                    args.queries, report, args.reuse)
        if "digits" in studies:
            qfile = os.path.join(root, "digits-queries.safetensors")
            d = call("digits", {"root": root, "queries_file": qfile})
            study("digits (1,500 x 256, ekfac)", {"project": d["project"], "queries_file": qfile,
                                                  "hessian": "ekfac", "repeats": 3},
                  [{"kind": "flat"}, {"kind": "ivf"}, {"kind": "hnsw"}], (10, 20, 50), report,
                  builds)
        big = os.path.join(root, "synthetic")
        if "synthetic" in studies:
            call("write", {"project": big, "rows": args.rows, "dim": args.dim, "seed": 0})
            params = {"project": big, "queries": args.queries, "dim": args.dim,
                      "hessian": "none", "repeats": 2}
            study(f"synthetic ({args.rows:,} x {args.dim}, bf16)", params,
                  [SYNTHETIC_VARIANTS[v] for v in args.variants.split(",")], CANDIDATES,
                  report, builds)
        wide = os.path.join(root, "wide")
        if "wide" in studies:
            call("write", {"project": wide, "rows": args.wide_rows, "dim": args.wide_dim,
                           "seed": 1})
            params = {"project": wide, "queries": args.queries, "dim": args.wide_dim,
                      "hessian": "none", "repeats": 2}
            study(f"wide ({args.wide_rows:,} x {args.wide_dim}, bf16): flat over a JL sketch",
                  params, [{"kind": "flat", "sketch": w} for w in (64, 128, 256, 512, 1024)],
                  (50, 100), report, builds)
    finally:
        if args.out is not None:  # merged: another run may have added its own
            on_disk = json.load(open(builds_file)) if os.path.isfile(builds_file) else {}
            with open(builds_file, "w") as f:
                json.dump({**on_disk, **builds}, f, indent=1)
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    for name, entry in report.items():
        if name == "latency":
            print_latency(entry)
        else:
            print_study(name, entry)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
