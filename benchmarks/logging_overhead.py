"""Logging overhead of LogIX at train time, against the naive design and against LogIX 0.1.1.

    python benchmarks/logging_overhead.py [--quick] [--profile] [--json out.json]

What it measures (each model / configuration in a fresh subprocess, so peaks are separate):

* Overhead: an epoch of SGD with LoGra logging (rank 32, grads saved, run.finalize() -- the final
  flush -- included) divided by the same epoch without logging, in the same process. Arms are
  interleaved round by round (plain, fp32 logs, bf16 logs; the order rotates), after a warm-up
  epoch of each; the ratio reported is the median over rounds of (logged / plain of that round).
  Models: a 4 x 512 MLP (+ untracked 10-class head; 4 x 32 x 32 = 4096 numbers per example), batch
  64, 20,000 examples; a tiny GPT-2 (4 layers, 256 wide, 128 tokens).
* Storage: bytes of the shards per example against rows x dim x dtype size, and against the
  fp32 full gradient of the tracked layers (the compression ratio).
* Naive design: full per-example gradients with torch.func.vmap(grad(...)), flattened, then a
  dense Gaussian projection [k, n_params] with k = the LoGra row width. When the dense matrix does
  not fit the memory budget it is applied in column chunks; the timing stand-in keeps one chunk
  resident and reuses it for every block of columns (same FLOPs and bytes per block as a resident
  matrix; the memory the full matrix needs is reported beside the measured peak).
* Old LogIX (optional): the same MLP logged with LogIX 0.1.1 from /work/peers/logix-ai-venv, in a
  subprocess of that venv; skipped cleanly when the venv is absent.
* --profile: where the logging time goes on the MLP (an ablation ladder that switches parts of
  the pipeline on one at a time, writer-phase timers, a cProfile of the training thread, and a
  probe of how long the writer thread holds the GIL).

The machine may be shared: every epoch records other processes' CPU use ("ext", in cores), the
harness waits for a quiet moment before each timed epoch, and the tables show the spread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import _common as C  # noqa: E402  (stdlib only at import time)

OLD_PYTHON = "/work/peers/logix-ai-venv/bin/python"

GOALS = {"mlp_fp32": 1.5, "mlp_bf16": 1.3, "naive_speedup": 3.0, "storage_pct": 2.0}


# ============================================================================ sizes
def sizes(quick: bool) -> dict:
    if quick:
        return {
            "mlp": dict(model="mlp", width=512, depth=4, classes=10, n=4096, batch=64, lr=1e-4),
            "gpt2": dict(model="gpt2", n_layer=2, n_embd=128, n_head=4, seq=64, vocab=500, n=64,
                         batch=8, lr=1e-5),
            "rounds": {"mlp": 2, "gpt2": 1, "old": 2, "profile": 1},
            "naive": {"mlp": dict(warmup=1, batches=1, col_frac=0.1),
                      "gpt2": dict(warmup=1, batches=1, col_frac=0.25)},
            "quiet_wait": 0.5, "max_time": 0.0,
        }
    return {
        "mlp": dict(model="mlp", width=512, depth=4, classes=10, n=20000, batch=64, lr=1e-4),
        "gpt2": dict(model="gpt2", n_layer=4, n_embd=256, n_head=4, seq=128, vocab=1000, n=512,
                     batch=16, lr=1e-5),
        "rounds": {"mlp": 5, "gpt2": 3, "old": 5, "profile": 3},
        "naive": {"mlp": dict(warmup=1, batches=3, col_frac=0.25),
                  "gpt2": dict(warmup=1, batches=2, col_frac=0.1)},
        "quiet_wait": 30.0, "max_time": 600.0,
    }


# ============================================================================ shared worker bits
def _setup_data(p):
    """(model, batches [(ids, x, y)], loss_fn(model, x, y), watch name_filter)."""
    import torch

    g = torch.Generator().manual_seed(1)
    n, b = p["n"], p["batch"]
    if p["model"] == "mlp":
        model = C.make_mlp(p["width"], p["depth"], p["classes"])
        X = torch.randn(n, p["width"], generator=g)
        Y = torch.randint(0, p["classes"], (n,), generator=g)
        batches = [(list(range(s, min(n, s + b))), X[s:s + b], Y[s:s + b]) for s in range(0, n, b)]
        return model, batches, C.mlp_loss, ["body"]
    model = C.make_gpt2(p["n_layer"], p["n_embd"], p["n_head"], p["seq"], p["vocab"])
    X = torch.randint(0, p["vocab"], (n, p["seq"]), generator=g)
    batches = [(list(range(s, min(n, s + b))), X[s:s + b], None) for s in range(0, n, b)]
    return model, batches, C.gpt2_loss, None


def _train_epoch(model, opt, batches, loss_fn, run=None):
    for ids, x, y in batches:
        if run is not None:
            run.start(data_id=ids)
        opt.zero_grad(set_to_none=True)
        loss_fn(model, x, y).backward()
        if run is not None:
            run.end()
        opt.step()


def _new_run(project, root, model, name_filter, rank, dtype):
    import logix

    run = logix.init(project, root_dir=root, log_dtype=dtype, seed=0)
    run.watch(model, name_filter=name_filter)
    run.add_lora(rank=rank)
    run.setup({"grad": ["log"]})
    run.save(True)
    return run


def _close_run(run):
    writer = getattr(run, "_writer", None)  # stop idle writer threads between epochs
    if writer is not None and hasattr(writer, "close"):
        try:
            writer.close()
        except Exception:
            pass


def _storage(run, project_dir, dtype) -> dict:
    import torch

    layout = run.layout()
    dim = sum(e.dim for e in layout)
    full = sum(e.in_dim * e.out_dim for e in layout)
    itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    logs = os.path.join(project_dir, "logs")
    shard_files = [f for f in os.listdir(logs) if f.endswith(".safetensors")] if os.path.isdir(
        logs) else []
    shard_bytes = sum(os.path.getsize(os.path.join(logs, f)) for f in shard_files)
    rows = None
    man = os.path.join(project_dir, "manifest.json")
    if os.path.exists(man):
        with open(man) as f:
            rows = sum(s.get("rows", 0) for s in json.load(f).get("shards", []))
    return dict(dim=dim, full_numbers=full, itemsize=itemsize, shards=len(shard_files),
                shard_bytes=shard_bytes, rows=rows, all_bytes=C.dir_bytes(project_dir))


# ============================================================================ worker: overhead
def worker_overhead(p):
    import torch

    C.set_threads(p.get("threads"))
    model, batches, loss_fn, name_filter = _setup_data(p)
    opt = torch.optim.SGD(model.parameters(), lr=p["lr"])
    root = tempfile.mkdtemp(prefix="logix-bench-", dir=p.get("root"))
    counter = [0]
    storage = {}

    def plain():
        C.quiesce(p["quiet_wait"])
        with C.Measure() as m:
            _train_epoch(model, opt, batches, loss_fn)
        return dict(m.as_dict(), finalize=0.0)

    def logged(dtype):
        counter[0] += 1
        project = f"{p['model']}-{dtype}-{counter[0]}"
        run = _new_run(project, root, model, name_filter, p["rank"], dtype)
        C.quiesce(p["quiet_wait"])
        with C.Measure() as m:
            _train_epoch(model, opt, batches, loss_fn, run)
            t = time.perf_counter()
            run.finalize()
            fin = time.perf_counter() - t
        project_dir = os.path.join(root, project)
        if dtype not in storage:
            storage[dtype] = _storage(run, project_dir, dtype)
        _close_run(run)
        shutil.rmtree(project_dir, ignore_errors=True)
        return dict(m.as_dict(), finalize=fin)

    arms = ["plain"] + [f"log-{d}" for d in p["dtypes"]]

    def do(arm):
        return plain() if arm == "plain" else logged(arm[4:])

    t0 = time.perf_counter()
    warm = {"plain": do("plain")}
    rss_plain = C.peak_rss_mb()
    for arm in arms[1:]:
        warm[arm] = do(arm)
    results, clean = C.interleaved(arms, do, p["rounds"], p["max_time"], p["clean_ext"])
    shutil.rmtree(root, ignore_errors=True)
    C.emit(dict(params=p, arms=results, clean=clean, warmup=warm, storage=storage,
                rss_plain_mb=rss_plain,
                rss_peak_mb=C.peak_rss_mb(), threads=torch.get_num_threads(),
                elapsed=time.perf_counter() - t0))


# ============================================================================ worker: naive
def worker_naive(p):
    import torch
    from torch.func import functional_call, grad, vmap

    import logix

    C.set_threads(p.get("threads"))
    model, batches, loss_fn, name_filter = _setup_data(p)
    opt = torch.optim.SGD(model.parameters(), lr=p["lr"])
    root = tempfile.mkdtemp(prefix="logix-bench-naive-", dir=p.get("root"))
    run = logix.init("dims", root_dir=root, seed=0)
    run.watch(model, name_filter=name_filter)
    run.add_lora(rank=p["rank"])
    k = sum(e.dim for e in run.layout())
    # The parameters LoGra covers: the weights of the tracked layers (tied weights once).
    by_id = {id(t): n for n, t in model.named_parameters()}
    names = []
    for tracked in run.modules.values():
        name = by_id.get(id(tracked.module.weight))
        if name is not None and name not in names:
            names.append(name)
    shutil.rmtree(root, ignore_errors=True)
    all_params = dict(model.named_parameters())
    n = sum(all_params[nm].numel() for nm in names)

    class Bound:  # the model called with explicit parameters
        def __init__(self, params):
            self.params = params

        def __call__(self, *args, **kwargs):
            return functional_call(model, self.params, args, kwargs)

    frozen = {nm: t.detach() for nm, t in all_params.items() if nm not in names}

    def one_loss(tp, x, y):
        xb = x[None]
        yb = None if y is None else y[None]
        return loss_fn(Bound({**frozen, **tp}), xb, yb)

    has_y = p["model"] == "mlp"
    per_example = vmap(grad(one_loss), in_dims=(None, 0, 0 if has_y else None))

    budget = p["p_budget_mb"] * 2**20
    full_bytes = k * n * 4
    t = time.perf_counter()
    if full_bytes <= budget:
        mode, width = "resident", n
        P = torch.randn(n, k) / math.sqrt(k)  # stored [n, k]: flat @ P
    else:
        mode = "chunked (one chunk reused)"
        width = max(1, int(p["chunk_mb"] * 2**20) // (k * 4))
        P = torch.randn(width, k) / math.sqrt(k)
    p_init = time.perf_counter() - t
    starts = list(range(0, n, width))
    use = starts[:max(1, math.ceil(len(starts) * p["col_frac"]))]

    def project(flat):
        out = torch.zeros(flat.shape[0], k)
        for c0 in use:
            w = min(width, n - c0)
            block = P[c0:c0 + w] if mode == "resident" else P[:w]
            out.addmm_(flat[:, c0:c0 + w], block)
        return out

    times = []
    for i, (ids, x, y) in enumerate(batches[: p["warmup"] + p["batches"]]):
        C.quiesce(p["quiet_wait"], sync=False)
        with C.Measure() as m_train:
            opt.zero_grad(set_to_none=True)
            loss_fn(model, x, y).backward()
            opt.step()
        tp = {nm: all_params[nm].detach() for nm in names}
        with C.Measure() as m_grad:
            g = per_example(tp, x, y)
            flat = torch.cat([g[nm].reshape(x.shape[0], -1) for nm in names], 1)
            del g
        with C.Measure() as m_proj:
            rows = project(flat)
        del flat, rows
        if i >= p["warmup"]:
            scale = len(starts) / len(use)
            times.append(dict(train=m_train.wall, grads=m_grad.wall, proj=m_proj.wall * scale,
                              proj_measured=m_proj.wall, ext=C.median(
                                  [m_train.ext, m_grad.ext, m_proj.ext])))
    C.emit(dict(params=p, k=k, n_params=n, mode=mode, chunk_cols=width, p_full_bytes=full_bytes,
                p_resident_bytes=P.numel() * 4, p_init_s=p_init, col_blocks=len(starts),
                col_blocks_timed=len(use), batches=len(batches), times=times,
                rss_peak_mb=C.peak_rss_mb(), threads=torch.get_num_threads()))


# ============================================================================ worker: LogIX 0.1.1
def worker_old(p):
    """Runs under the LogIX 0.1.1 venv: `import logix` is *their* package here."""
    import copy
    import glob

    import torch

    import logix  # LogIX 0.1.1

    C.set_threads(p.get("threads"))
    model, batches, loss_fn, name_filter = _setup_data(p)
    root = tempfile.mkdtemp(prefix="logix-old-bench-", dir=p.get("root"))
    arms = {"plain": dict(model=model, run=None)}
    info = {}
    for dtype in p["dtypes"]:
        m = copy.deepcopy(model)
        cfg = os.path.join(root, f"config-{dtype}.yaml")
        with open(cfg, "w") as f:
            f.write(f"root_dir: {root}\nlogging:\n  log_dtype: {dtype}\n  num_workers: 1\n"
                    f"lora:\n  init: random\n  rank: {p['rank']}\n")
        run = logix.LogIX(project=f"old-{dtype}", config=cfg)
        run.watch(m, name_filter=name_filter)
        run.add_lora()
        run.setup({"grad": ["log"]})
        run.save(True)
        # LogIX 0.1.1's watch() freezes every untracked parameter (meant for a separate logging
        # pass). Logging *during training* must keep training the model: unfreeze the original
        # weights so both arms run the same backward and optimizer step.
        for name, t in m.named_parameters():
            if "logix_lora" not in name:
                t.requires_grad_(True)
        arms[f"log-{dtype}"] = dict(model=m, run=run)
        info[dtype] = dict(tracked=list(run.logger.modules_to_name.values()))
    for arm in arms.values():
        params = [t for nm, t in arm["model"].named_parameters() if "logix_lora" not in nm]
        arm["opt"] = torch.optim.SGD(params, lr=p["lr"])
    storage = {}

    def do(name):
        arm = arms[name]
        run = arm["run"]
        C.quiesce(p["quiet_wait"])
        with C.Measure() as m:
            for ids, x, y in batches:
                if run is not None:
                    run.start(data_id=ids)
                arm["opt"].zero_grad(set_to_none=True)
                loss_fn(arm["model"], x, y).backward()
                if run is not None:
                    run.end()
                arm["opt"].step()
            t = time.perf_counter()
            if run is not None:
                run.finalize()
            fin = time.perf_counter() - t
        if run is not None:
            dtype = name[4:]
            files = glob.glob(os.path.join(run.log_dir, "log_rank_*_chunk_*"))
            if dtype not in storage:
                data = sum(os.path.getsize(f) for f in files if f.endswith(".mmap"))
                meta = sum(os.path.getsize(f) for f in files if f.endswith(".json"))
                storage[dtype] = dict(rows=sum(len(b[0]) for b in batches), data_bytes=data,
                                      metadata_bytes=meta)
            for f in files:
                os.remove(f)
        return dict(m.as_dict(), finalize=fin)

    names = list(arms)
    warm = {nm: do(nm) for nm in names}
    results, clean = C.interleaved(names, do, p["rounds"], p["max_time"], p["clean_ext"])
    shutil.rmtree(root, ignore_errors=True)
    C.emit(dict(params=p, arms=results, clean=clean, warmup=warm, storage=storage, info=info,
                version=getattr(logix, "__version__", "?"), rss_peak_mb=C.peak_rss_mb(),
                threads=torch.get_num_threads()))


# ============================================================================ worker: profile
def worker_profile(p):
    """Where does the logging time go? MLP, one log dtype, one thread setting."""
    import cProfile
    import hashlib
    import io
    import pstats
    import threading

    import torch

    import logix.storage.writer as W

    C.set_threads(p.get("threads"))
    model, batches, loss_fn, name_filter = _setup_data(p)
    opt = torch.optim.SGD(model.parameters(), lr=p["lr"])
    root = tempfile.mkdtemp(prefix="logix-bench-prof-", dir=p.get("root"))
    dtype = p["dtype"]
    orig_write = W.ShardWriter._write
    orig_atomic = getattr(W, "atomic_write", None)
    ser = getattr(W, "safetensors_bytes", None)

    def write_noop(self, seq, ids, rows, *rest):
        return None

    def write_serialise(self, seq, ids, rows, *rest):
        ser({"grad": rows.contiguous()}, metadata={"data_ids": json.dumps(ids)})

    def write_serialise_sha(self, seq, ids, rows, *rest):
        data = ser({"grad": rows.contiguous()}, metadata={"data_ids": json.dumps(ids)})
        hashlib.sha256(data).hexdigest()

    def atomic_nofsync(path, data):
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)

    variants = [  # (name, save, _write, atomic_write)
        ("plain", None, None, None),
        ("hooks+assemble (save False)", False, None, None),
        ("+ cast/host copy/queue (write no-op)", True, write_noop, None),
        ("+ safetensors serialise", True, write_serialise, None),
        ("+ sha256", True, write_serialise_sha, None),
        ("+ file write, no fsync", True, orig_write, atomic_nofsync),
        ("full (fsync, rename, manifest)", True, orig_write, orig_atomic),
    ]
    if ser is None or orig_atomic is None:  # the writer changed: keep what still applies
        variants = [v for v in variants if v[2] in (None, write_noop, orig_write)
                    and v[3] is None]

    counter = [0]

    def epoch(variant, profiler=None):
        name, save, write, atomic = variant
        W.ShardWriter._write = write or orig_write
        if orig_atomic is not None:
            W.atomic_write = atomic or orig_atomic
        run = None
        if save is not None:
            counter[0] += 1
            run = _new_run(f"p{counter[0]}", root, model, name_filter, p["rank"], dtype)
            run.save(save)
        C.quiesce(p["quiet_wait"])
        try:
            if profiler is not None:
                profiler.enable()
            with C.Measure() as m:
                _train_epoch(model, opt, batches, loss_fn, run)
                if run is not None:
                    run.finalize()
            if profiler is not None:
                profiler.disable()
        finally:
            W.ShardWriter._write = orig_write
            if orig_atomic is not None:
                W.atomic_write = orig_atomic
        if run is not None:
            _close_run(run)
            shutil.rmtree(os.path.join(root, f"p{counter[0]}"), ignore_errors=True)
        return m.as_dict()

    for v in variants:  # warm-up
        epoch(v)
    by_name = {v[0]: v for v in variants}
    ladder, clean = C.interleaved(list(by_name), lambda n: epoch(by_name[n]), p["rounds"],
                                  p["max_time"], p["clean_ext"])

    # ---- writer-thread phase timers (one full epoch, instrumented)
    phase = {"serialise": 0.0, "sha256": 0.0, "atomic_write (write+fsync+rename)": 0.0,
             "manifest update": 0.0, "append (training thread)": 0.0}
    counts = {"shards": 0}
    lock = threading.Lock()

    def timed(key, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                with lock:
                    phase[key] += time.perf_counter() - t
        return wrapper

    class HashShim:
        @staticmethod
        def sha256(data):
            t = time.perf_counter()
            h = hashlib.sha256(data)
            with lock:
                phase["sha256"] += time.perf_counter() - t
            return h

    saved = dict(ser=ser, atomic=orig_atomic, hashlib=getattr(W, "hashlib", None),
                 append=W.ShardWriter.append)
    instrumented = None
    if ser is not None and orig_atomic is not None and saved["hashlib"] is not None:
        W.safetensors_bytes = timed("serialise", ser)
        W.atomic_write = timed("atomic_write (write+fsync+rename)", orig_atomic)
        W.hashlib = HashShim
        W.ShardWriter.append = timed("append (training thread)", saved["append"])
        counter[0] += 1
        run = _new_run(f"p{counter[0]}", root, model, name_filter, p["rank"], dtype)
        orig_on_shard = run._on_shard

        def on_shard(entry):
            counts["shards"] += 1
            return timed("manifest update", orig_on_shard)(entry)

        run._on_shard = on_shard
        C.quiesce(p["quiet_wait"])
        try:
            with C.Measure() as m:
                _train_epoch(model, opt, batches, loss_fn, run)
                t = time.perf_counter()
                run.finalize()
                fin = time.perf_counter() - t
        finally:
            W.safetensors_bytes, W.atomic_write = saved["ser"], saved["atomic"]
            W.hashlib, W.ShardWriter.append = saved["hashlib"], saved["append"]
        _close_run(run)
        shutil.rmtree(os.path.join(root, f"p{counter[0]}"), ignore_errors=True)
        instrumented = dict(epoch=m.as_dict(), finalize=fin, phases=phase, shards=counts["shards"])

    components = _components(p, model, opt, batches, loss_fn, name_filter, root)

    # ---- cProfile of the training thread (writer disabled, so only the hook path shows)
    prof = cProfile.Profile()
    epoch(("cprofile", True, write_noop, None), profiler=prof)
    stream = io.StringIO()
    st = pstats.Stats(prof, stream=stream)
    total = sum(v[2] for v in st.stats.values())  # tottime over all functions
    rows = []
    for (fname, line, func), (cc, nc, tt, ct, callers) in st.stats.items():
        rows.append(dict(func=f"{os.path.relpath(fname, REPO) if fname.startswith(REPO) else os.path.basename(fname)}:{line}({func})"
                         if fname != "~" else func, tottime=tt, cumtime=ct, calls=nc))
    rows.sort(key=lambda r: -r["tottime"])
    logix_cum = sorted((r for r in rows if r["func"].startswith("logix/")),
                       key=lambda r: -r["cumtime"])[:14]

    # ---- GIL probe: does the writer thread stall the training thread?
    gil = {}
    counter[0] += 1
    probe_run = _new_run(f"p{counter[0]}", root, model, name_filter, p["rank"], dtype)
    dim = sum(e.dim for e in probe_run.layout())
    cfg = probe_run.config.logging
    rps = getattr(cfg, "shard_rows", None) or max(1, cfg.flush_threshold // dim)
    shard = torch.randn(min(rps, len(batches) * p["batch"]), dim).to(getattr(torch, dtype))

    def probe(fn):
        done = threading.Event()
        gaps = []

        def work():
            fn()
            done.set()

        th = threading.Thread(target=work)
        last = time.perf_counter()
        th.start()
        while not done.is_set():
            sum(range(100))
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        th.join()
        return max(gaps) if gaps else 0.0

    if ser is not None:
        data = ser({"grad": shard.contiguous()}, metadata={"data_ids": json.dumps(list(range(
            shard.shape[0])))})
        gil["serialise"] = probe(lambda: ser({"grad": shard.contiguous()}))
        gil["sha256"] = probe(lambda: hashlib.sha256(data).hexdigest())
        tmp = os.path.join(root, "probe.bin")
        gil["write+fsync"] = probe(lambda: orig_atomic(tmp, data))
        gil["shard_bytes"] = len(data)
    shutil.rmtree(root, ignore_errors=True)
    C.emit(dict(params=p, ladder=ladder, clean=clean, components=components,
                instrumented=instrumented, cprofile_total=total,
                cprofile_top=rows[:25], cprofile_logix=logix_cum, gil=gil, rows_per_shard=rps, dim=dim,
                threads=torch.get_num_threads()))


def _best(fn, repeats, inner=1):
    """Smallest time of `repeats` runs of fn (x inner), per call: a busy machine only adds."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t) / inner)
    return best


def _components(p, model, opt, batches, loss_fn, name_filter, root):
    """Cost of each piece of the logging path in isolation, best of many repeats (so other
    processes' load mostly drops out). Per-step pieces in microseconds, per-shard in ms."""
    import hashlib

    import torch

    import logix.storage.writer as W

    run = _new_run("components", root, model, name_filter, p["rank"], p["dtype"])
    run.save(False)
    ids, x, y = batches[0]
    b = x.shape[0]
    reps = p.get("component_repeats", 30)

    def plain_step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model, x, y).backward()

    def hooked_step():
        run.start(data_id=ids)
        opt.zero_grad(set_to_none=True)
        loss_fn(model, x, y).backward()
        run.end()

    for _ in range(3):
        plain_step()
        hooked_step()
    step_plain = _best(plain_step, reps)
    step_hooks = _best(hooked_step, reps)

    # Inputs of each tracked layer and gradients of its output, captured once.
    acts, grads_out, handles = {}, {}, []
    for name, tr in run.modules.items():
        def fwd(mod, inp, out, name=name):
            acts[name] = inp[0].detach()
            out.register_hook(lambda g, name=name: grads_out.__setitem__(name, g.detach()))
        handles.append(tr.module.register_forward_hook(fwd))
    opt.zero_grad(set_to_none=True)
    loss_fn(model, x, y).backward()
    for h in handles:
        h.remove()
    proj = {n: run._projection_for(n, acts[n].device, acts[n].dtype) for n in run.modules}
    xp = {n: run.modules[n].project_input(acts[n], proj[n].p_in) for n in run.modules}
    dp = {n: run.modules[n].project_output(grads_out[n], proj[n].p_out) for n in run.modules}

    def project_in():
        for n, tr in run.modules.items():
            tr.project_input(acts[n], proj[n].p_in)

    def project_out():
        for n, tr in run.modules.items():
            tr.project_output(grads_out[n], proj[n].p_out)

    def einsum():
        for n in run.modules:
            torch.einsum("bgno,bgni->boi", dp[n].float(), xp[n].float())

    def bmm():  # the same contraction as one batched matmul, for comparison
        for n in run.modules:
            d, xx = dp[n], xp[n]
            torch.bmm(d.reshape(b, -1, d.shape[-1]).transpose(1, 2),
                      xx.reshape(b, -1, xx.shape[-1]))

    g = {n: torch.einsum("bgno,bgni->boi", dp[n].float(), xp[n].float()) for n in run.modules}
    rows = torch.cat([g[n].reshape(b, -1) for n in run.modules], 1)
    out = {}
    out["plain training step (fwd+bwd)"] = step_plain
    out["training step with hooks, save(False)"] = step_hooks
    out["project_input x P_i^T (all layers)"] = _best(project_in, reps, 5)
    out["project_output dy P_o^T (all layers)"] = _best(project_out, reps, 5)
    out["einsum dy~ x~^T (all layers)"] = _best(einsum, reps, 5)
    out["  same as torch.bmm"] = _best(bmm, reps, 5)
    out["_assemble: torch.cat of layer blocks"] = _best(
        lambda: torch.cat([g[n].reshape(b, -1) for n in run.modules], 1), reps, 5)
    out["isfinite(rows).all() check"] = _best(lambda: bool(torch.isfinite(rows).all()), reps, 5)
    out["run.layout() rebuilt in end()"] = _best(run.layout, reps, 5)
    out["start(): hooks registered (GradientCapture)"] = _best(
        lambda: (run.start(data_id=ids), run._capture.__exit__(None, None, None),
                 setattr(run, "_capture", None)), reps, 5)
    out["cast rows to bfloat16"] = _best(lambda: rows.to(torch.bfloat16), reps, 5)
    out["writer.append host copy (rows.to('cpu', copy=True))"] = _best(
        lambda: rows.detach().to("cpu", copy=True), reps, 5)
    per_step = dict(out)

    # Per shard (the default flush_threshold gives this many rows).
    dim = rows.shape[1]
    cfg = run.config.logging
    rps = getattr(cfg, "shard_rows", None) or max(1, cfg.flush_threshold // dim)
    rps = min(rps, len(batches) * b)
    dtype = getattr(torch, p["dtype"])
    parts = [rows.to(dtype) for _ in range(max(1, rps // b))]
    shard = torch.cat(parts, 0)
    ids_json = json.dumps(list(range(shard.shape[0])))
    shard_reps = max(2, min(5, reps // 10))
    per_shard = {}
    per_shard["_submit: torch.cat of the step blocks"] = _best(lambda: torch.cat(parts, 0),
                                                              shard_reps)
    data = W.safetensors_bytes({"grad": shard}, metadata={"data_ids": ids_json})
    per_shard["safetensors serialise to bytes (GIL held)"] = _best(
        lambda: W.safetensors_bytes({"grad": shard}, metadata={"data_ids": ids_json}), shard_reps)
    per_shard["sha256 of the shard"] = _best(lambda: hashlib.sha256(data).hexdigest(), shard_reps)
    path = os.path.join(root, "component.bin")

    def write_only():
        with open(path, "wb") as f:
            f.write(data)

    def write_fsync():
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    per_shard["file write (page cache)"] = _best(write_only, shard_reps)
    per_shard["file write + fsync"] = _best(write_fsync, shard_reps)
    os.remove(path)
    for key in list(per_step):
        per_step[key] *= 1e6
    for key in list(per_shard):
        per_shard[key] *= 1e3
    return dict(per_step_us=per_step, per_shard_ms=per_shard, steps=len(batches),
                rows=sum(len(bt[0]) for bt in batches),
                rows_per_shard=rps, shard_bytes=len(data), dim=dim)


# ============================================================================ worker: what-if
# Prototypes of the recommended writer / end() changes, applied in this process only by
# monkeypatching, to measure what they would gain. Not part of the library.
_ST_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def _proto_stream_write(self, seq, ids, rows, *rest):
    """ShardWriter._write without the in-memory copy: the safetensors header, then the tensor's
    own bytes straight from its storage, hashed chunk by chunk while they are written (file
    writes and sha256 updates release the GIL). Same file format, same manifest entry."""
    import dataclasses
    import hashlib

    import torch

    from logix.storage import format as F
    from logix.storage.manifest import ShardEntry

    rows = rows.contiguous()
    nbytes = rows.numel() * rows.element_size()
    header = {"__metadata__": {F.DATA_IDS_KEY: json.dumps(ids)},
              F.GRAD_KEY: {"dtype": _ST_DTYPE[str(rows.dtype).split(".")[-1]],
                           "shape": list(rows.shape), "data_offsets": [0, nbytes]}}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    prefix = len(head).to_bytes(8, "little") + head
    body = memoryview(rows.reshape(-1).view(torch.uint8).numpy())
    name = F.shard_name(self.rank, seq)
    os.makedirs(os.path.join(self.project_dir, F.LOGS_DIR), exist_ok=True)
    path = os.path.join(self.project_dir, F.LOGS_DIR, name)
    digest = hashlib.sha256(prefix)
    step = 8 << 20
    with open(path + F.TMP_SUFFIX, "wb") as f:
        f.write(prefix)
        for i in range(0, nbytes, step):
            chunk = body[i:i + step]
            f.write(chunk)
            digest.update(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + F.TMP_SUFFIX, path)
    _fsync_dir(os.path.dirname(path))
    kwargs = dict(file=f"{F.LOGS_DIR}/{name}", rows=rows.shape[0], bytes=len(prefix) + nbytes,
                  sha256=digest.hexdigest(), rank=self.rank, seq=seq)
    if rest and "checkpoint" in {fl.name for fl in dataclasses.fields(ShardEntry)}:
        kwargs["checkpoint"] = rest[0]
    entry = ShardEntry(**kwargs)
    with self._announce:
        self.on_shard(entry)
    pool = getattr(self, "_proto_pool", None)
    if pool is not None and rows._base is not None:  # hand the shard buffer back for reuse
        pool.append(rows._base)


class _NoHash:
    def __init__(self, *a):
        pass

    def update(self, *a):
        pass

    def hexdigest(self):
        return "0" * 64


def _proto_stream_write_nohash(self, seq, ids, rows, *rest):
    import hashlib

    real = hashlib.sha256
    hashlib.sha256 = _NoHash  # only this thread calls it while the writer runs
    try:
        return _proto_stream_write(self, seq, ids, rows, *rest)
    finally:
        hashlib.sha256 = real


def _proto_nice_work(orig):
    """The writer thread lowers its own priority (Linux: nice is per thread) so that the
    training threads get the cores first; it catches up in their gaps and at the final flush."""
    def work(self):
        import threading

        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + 10))
        except (OSError, AttributeError):
            pass
        return orig(self)
    return work


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _proto_prealloc_append(self, data_ids, rows):
    """ShardWriter.append copying each step's rows straight into a preallocated shard buffer
    (recycled after the writer is done with it): no per-step host copy, no torch.cat of the
    step blocks and no tail clone per shard, no first-touch page faults of a new buffer."""
    import contextlib

    self.raise_if_failed()
    if not hasattr(self, "_proto_pool"):
        self._proto_pool, self._proto_buf, self._proto_fill = [], None, 0
    lock = getattr(self, "_buffer", None)  # the writer's buffer lock, where it has one
    with lock if lock is not None else contextlib.nullcontext():
        _proto_fill_rows(self, data_ids, rows)


def _proto_fill_rows(self, data_ids, rows):
    import torch

    n, i = rows.shape[0], 0
    while i < n:
        if self._proto_buf is None:
            buf = self._proto_pool.pop() if self._proto_pool else None
            if buf is None or buf.dtype != rows.dtype or buf.shape[1] != rows.shape[1]:
                buf = torch.empty(self.rows_per_shard, rows.shape[1], dtype=rows.dtype)
            self._proto_buf, self._proto_fill = buf, 0
        take = min(n - i, self._proto_buf.shape[0] - self._proto_fill)
        self._proto_buf[self._proto_fill:self._proto_fill + take].copy_(rows[i:i + take])
        self._pending_ids.extend(data_ids[i:i + take])
        self._proto_fill += take
        self._pending += take
        i += take
        if self._proto_fill == self._proto_buf.shape[0]:
            self._submit(self._proto_fill)


def _proto_submit(orig):
    def submit(self, n):
        buf = getattr(self, "_proto_buf", None)
        if buf is not None:  # the original _submit then queues this one block without copying
            self._pending_rows = [(buf[:self._proto_fill], None)]
            self._proto_buf, self._proto_fill = None, 0
        return orig(self, n)
    return submit


class _LazyAll:
    def __init__(self, t):
        self.t = t

    def all(self, *args, **kwargs):
        import torch

        if args or kwargs:
            return torch.isfinite(self.t).all(*args, **kwargs)
        s = torch.isfinite(self.t.sum())  # one reduction; exact check only if it fails
        return s if bool(s) else torch.isfinite(self.t).all()


class _TorchFastFinite:
    """Stands in for `torch` inside logix.run: isfinite(rows).all() becomes one sum."""

    def __getattr__(self, name):
        import torch

        return getattr(torch, name)

    @staticmethod
    def isfinite(t):
        import torch

        return _LazyAll(t) if t.dim() == 2 else torch.isfinite(t)


def worker_whatif(p):
    import torch

    import logix.run as R
    import logix.storage.writer as W

    C.set_threads(p.get("threads"))
    model, batches, loss_fn, name_filter = _setup_data(p)
    opt = torch.optim.SGD(model.parameters(), lr=p["lr"])
    root = tempfile.mkdtemp(prefix="logix-bench-whatif-", dir=p.get("root"))
    orig = dict(write=W.ShardWriter._write, append=W.ShardWriter.append,
                work=W.ShardWriter._work,
                submit=W.ShardWriter._submit, torch=R.torch)
    small = p["small_shard_rows"]
    arms = {  # name: (dtype, shard_rows, stream, prealloc, fast_finite)
        "plain": None,
        "as is, fp32": ("float32", None, False, False, False),
        f"shard_rows={small}": ("float32", small, False, False, False),
        "+ streaming write": ("float32", small, True, False, False),
        "+ preallocated buffers": ("float32", small, True, True, False),
        "+ isfinite via sum (all)": ("float32", small, True, True, True),
        "+ writer thread at nice +10": ("float32", small, True, True, True, "nice"),
        "  (no sha256: what it costs)": ("float32", small, "nohash", True, True, "nice"),
        "as is, bf16": ("bfloat16", None, False, False, False),
        "all changes, bf16": ("bfloat16", small, True, True, True, "nice"),
    }
    counter = [0]
    checks = {}

    def do(name):
        spec = arms[name]
        if spec is None:
            C.quiesce(p["quiet_wait"])
            with C.Measure() as m:
                _train_epoch(model, opt, batches, loss_fn)
            return dict(m.as_dict(), finalize=0.0)
        dtype, shard_rows, stream, prealloc, fast = spec[:5]
        nice_writer = len(spec) > 5
        counter[0] += 1
        import logix

        project = f"w{counter[0]}"
        run = logix.init(project, root_dir=root, log_dtype=dtype, seed=0,
                         **({"shard_rows": shard_rows} if shard_rows else {}))
        run.watch(model, name_filter=name_filter)
        run.add_lora(rank=p["rank"])
        run.setup({"grad": ["log"]})
        run.save(True)
        W.ShardWriter._write = (_proto_stream_write if stream is True else
                                _proto_stream_write_nohash if stream == "nohash" else
                                orig["write"])
        W.ShardWriter._work = _proto_nice_work(orig["work"]) if nice_writer else orig["work"]
        W.ShardWriter.append = _proto_prealloc_append if prealloc else orig["append"]
        W.ShardWriter._submit = _proto_submit(orig["submit"]) if prealloc else orig["submit"]
        R.torch = _TorchFastFinite() if fast else orig["torch"]
        C.quiesce(p["quiet_wait"])
        try:
            with C.Measure() as m:
                _train_epoch(model, opt, batches, loss_fn, run)
                t = time.perf_counter()
                run.finalize()
                fin = time.perf_counter() - t
        finally:
            W.ShardWriter._write, W.ShardWriter.append = orig["write"], orig["append"]
            W.ShardWriter._submit, R.torch = orig["submit"], orig["torch"]
            W.ShardWriter._work = orig["work"]
        project_dir = os.path.join(root, project)
        if name not in checks and stream == "nohash":
            checks[name] = "n/a (no sha256)"
        elif name not in checks:
            checks[name] = _check_logs(run, project_dir, sum(len(b[0]) for b in batches))
        _close_run(run)
        shutil.rmtree(project_dir, ignore_errors=True)
        return dict(m.as_dict(), finalize=fin)

    names = list(arms)
    for nm in names:
        do(nm)
    results, clean = C.interleaved(names, do, p["rounds"], p["max_time"], p["clean_ext"])
    shutil.rmtree(root, ignore_errors=True)
    C.emit(dict(params=p, arms=results, clean=clean, checks=checks,
                rss_peak_mb=C.peak_rss_mb(), threads=torch.get_num_threads()))


def _check_logs(run, project_dir, rows_expected) -> str:
    """Shards readable by safetensors and LogIX's reader, sizes and sha256 as the manifest says."""
    import hashlib

    from safetensors.torch import load_file

    try:
        man = json.load(open(os.path.join(project_dir, "manifest.json")))
        total = 0
        for sh in man["shards"]:
            path = os.path.join(project_dir, sh["file"])
            with open(path, "rb") as f:
                data = f.read()
            if len(data) != sh["bytes"] or hashlib.sha256(data).hexdigest() != sh["sha256"]:
                return f"bad size/sha256 in {sh['file']}"
            t = load_file(path)["grad"]
            total += t.shape[0]
        n = sum(len(ids) for ids, _ in run.reader())
        if total != rows_expected or n != rows_expected:
            return f"rows {total}/{n} != {rows_expected}"
        return "ok"
    except Exception as e:  # report, do not hide
        return f"error: {e!r}"[:200]


WORKERS = {"whatif": worker_whatif, "overhead": worker_overhead, "naive": worker_naive, "old": worker_old,
           "profile": worker_profile}


# ============================================================================ parent: reports
def _ratios(arms, arm, base="plain", key="wall"):
    return [a[key] / b[key] for a, b in zip(arms[arm], arms[base])]


def _rounds_note(res):
    clean = res.get("clean", [])
    if res.get("params", {}).get("clean_ext") == float("inf"):
        return f"{len(clean)} rounds"
    if any(clean):
        return f"{sum(clean)} clean rounds of {len(clean)} used"
    return f"all {len(clean)} rounds used (none clean: machine busy, ratios are noisy)"


def _spread(xs):
    return f"{min(xs):.2f}-{max(xs):.2f}" if xs else "n/a"


def report_overhead(results, old=None):
    rows = []
    ratios = {}
    for res in results:
        p, arms = res["params"], C.pick(res["arms"], res.get("clean", []))
        label = p["model"].upper() if p["model"] == "mlp" else "GPT-2"
        thr = f"{res['threads']}" + ("" if p.get("threads") else " (default)")
        for arm in arms:
            walls = [a["wall"] for a in arms[arm]]
            fin = C.median([a["finalize"] for a in arms[arm]])
            ext = C.median([a["ext"] for a in arms[arm]])
            rss = max([a.get("rss_peak", float("nan")) for a in res["arms"][arm]])
            if arm == "plain":
                rows.append([label, thr, arm, C.fmt(C.median(walls)), "", "", "", "",
                             f"{rss:.0f}", C.fmt(ext, 2)])
                continue
            r = _ratios(arms, arm)
            rc = _ratios(arms, arm, key="cpu")
            ratios[(p["model"], arm[4:], res["threads"], bool(p.get("threads")))] = C.median(r)
            rows.append([label, thr, arm, C.fmt(C.median(walls)), C.fmt(fin),
                         f"{C.median(r):.2f}x", _spread(r), f"{C.median(rc):.2f}x",
                         f"{rss:.0f}", C.fmt(ext, 2)])
    print(C.table(["model", "threads", "arm", "epoch s", "finalize s", "ratio (median)",
                   "ratio range", "cpu-time ratio", "peak RSS MiB", "others' cores"], rows,
                  "== Logging overhead: epoch with logging (incl. run.finalize) / same epoch "
                  "without; median over interleaved rounds =="))
    for res in results:
        p = res["params"]
        print(f"   {p['model']} threads={res['threads']}: {p['n']} examples, batch {p['batch']}, "
              f"rank {p['rank']}, {_rounds_note(res)}; peak RSS plain-only "
              f"{res['rss_plain_mb']:.0f} MiB, with logging {res['rss_peak_mb']:.0f} MiB; "
              f"priority: {p.get('priority', 'none')}")
    print("   others' cores = CPU other processes got during the epoch (2 = the whole machine); "
          "with --nice they only get what this\n   process leaves idle, so a higher value in a "
          "logged arm means the training thread was waiting (GIL, queue, fsync).")
    return ratios


def report_storage(results):
    rows = []
    worst = 0.0
    for res in results:
        if res["params"].get("threads"):
            continue
        for dtype, s in res["storage"].items():
            per_ex = s["shard_bytes"] / s["rows"]
            expect = s["dim"] * s["itemsize"]
            pct = 100.0 * (per_ex - expect) / expect
            worst = max(worst, abs(pct))
            full = s["full_numbers"] * 4
            rows.append([res["params"]["model"], dtype, s["rows"], s["dim"], s["shards"],
                         f"{per_ex:,.1f}", f"{expect:,}", f"{pct:+.3f}%",
                         f"{s['all_bytes'] / s['rows']:,.1f}", f"{full:,}",
                         f"{full / per_ex:,.0f}x"])
    print(C.table(["model", "dtype", "rows", "dim", "shards", "B/example (shards)",
                   "rows*dim*size", "overhead", "B/example (all files)",
                   "full grad B (fp32)", "compression"], rows,
                  "== Storage: shard bytes per example vs rows x dim x dtype size, and vs the "
                  "full fp32 per-example gradient of the tracked layers =="))
    print("   'all files' adds manifest.json and state/ (projections, statistics) to the shards.")
    return worst


def report_naive(naive, overhead):
    rows = []
    speedups = {}
    logged = {}
    for res in overhead:
        if res["params"].get("threads"):
            continue
        a = res["arms"]
        logged[res["params"]["model"]] = dict(
            plain=C.median([x["wall"] for x in a["plain"]]),
            log=C.median([x["wall"] for x in a.get("log-float32", a["plain"])]),
            rss=res["rss_peak_mb"], rss_plain=res["rss_plain_mb"])
    for res in naive:
        m = res["params"]["model"]
        t = res["times"]
        tr, gr, pr = (C.median([x[k] for x in t]) for k in ("train", "grads", "proj"))
        per_batch = tr + gr + pr
        epoch = per_batch * res["batches"]
        L = logged.get(m)
        sp = epoch / L["log"] if L else float("nan")
        extra = (epoch - L["plain"]) / max(1e-9, L["log"] - L["plain"]) if L else float("nan")
        resident = res["rss_peak_mb"] + (res["p_full_bytes"] - res["p_resident_bytes"]) / 2**20
        speedups[m] = dict(epoch=sp, extra=extra,
                           mem=(L["rss"] / res["rss_peak_mb"]) if L else float("nan"),
                           mem_resident=(L["rss"] / resident) if L else float("nan"))
        note = (f"{res['col_blocks_timed']}/{res['col_blocks']} col blocks timed, scaled"
                if res["col_blocks_timed"] < res["col_blocks"] else "all col blocks timed")
        rows.append([m, res["k"], f"{res['n_params']:,}", f"{tr:.3f}", f"{gr:.3f}", f"{pr:.3f}",
                     f"{epoch:.1f}", C.fmt(L["log"] if L else None, 2), f"{sp:.1f}x",
                     f"{extra:.0f}x", f"{res['rss_peak_mb']:.0f}", f"{resident:,.0f}",
                     f"{L['rss']:.0f}" if L else "n/a",
                     C.human_bytes(res["p_full_bytes"]), res["mode"], note])
    print(C.table(["model", "k", "n params", "train s/b", "vmap grads s/b", "project s/b",
                   "naive epoch s (est)", "LoGra fp32 epoch s", "speedup", "logging-cost speedup",
                   "naive peak MiB", "naive peak, P resident", "LoGra peak MiB", "dense P needs",
                   "P held", "projection"],
                  rows, "== Naive design: vmap(grad) per-example gradients + dense Gaussian "
                  "projection to the same k, same batches (s/b = seconds per batch) =="))
    print("   naive epoch = batches x median per-batch time; naive rows are not written to disk "
          "(favours naive).\n   logging-cost speedup = (naive epoch - plain) / (LoGra epoch - "
          "plain). Peaks: ru_maxrss of each fresh subprocess.")
    return speedups


def report_old(old, ours_ratios):
    if old is None:
        return None
    rows = []
    arms = C.pick(old["arms"], old.get("clean", []))
    out = {}
    for arm in arms:
        walls = [a["wall"] for a in arms[arm]]
        if arm == "plain":
            rows.append(["LogIX 0.1.1", arm, C.fmt(C.median(walls)), "", "", "", ""])
            continue
        r = C.median(_ratios(arms, arm))
        dtype = arm[4:]
        s = old["storage"].get(dtype, {})
        per_ex = (s.get("data_bytes", 0) + s.get("metadata_bytes", 0)) / max(1, s.get("rows", 1))
        ours_dtype = "float32" if dtype in ("none", "float32") else "bfloat16"
        ours = ours_ratios.get(("mlp", ours_dtype, None, False))
        if ours is None:
            ours = next((v for (m, d, t, pinned), v in ours_ratios.items()
                         if m == "mlp" and d == ours_dtype and not pinned), None)
        out[dtype] = dict(theirs=r, ours=ours)
        rows.append(["LogIX 0.1.1", arm, C.fmt(C.median(walls)),
                     f"{r:.2f}x", f"{per_ex:,.0f} (meta {s.get('metadata_bytes', 0) / max(1, s.get('rows', 1)):,.0f})",
                     f"{ours:.2f}x ({ours_dtype})" if ours else "n/a",
                     f"{ours / r:.2f} / {(ours - 1) / max(1e-9, r - 1):.2f}" if ours else "n/a"])
    print(C.table(["library", "arm", "epoch s", "ratio vs plain", "B/example on disk",
                   "ours (same MLP)", "ours/theirs: ratio / extra time"], rows,
                  f"== Old LogIX {old.get('version')} on the same MLP (its own subprocess and "
                  "plain baseline) =="))
    print(f"   {_rounds_note(old)}; peak RSS {old['rss_peak_mb']:.0f} MiB.")
    print("   LogIX 0.1.1 inserts LoRA modules (A, zero B, C) into the model and logs B's gradient; "
          "its watch() freezes untracked weights, which this benchmark unfreezes so that both\n"
          "   arms still train. Both track the same 4 body layers (rank 32: 4096 numbers per "
          "example).\n   bfloat16 logs crash in 0.1.1 (numpy has no bf16), so its half-precision arm is float16.")
    return out


def report_goals(ratios, speedups, worst_storage, naive):
    def get(model, dtype):
        return next((v for (m, d, t, pinned), v in ratios.items()
                     if m == model and d == dtype and not pinned), float("nan"))

    rows = []
    v = get("mlp", "float32")
    if v == v:
        rows.append(["MLP overhead, fp32 logs", "<= 1.5x", f"{v:.2f}x",
                     _pf(v <= GOALS["mlp_fp32"])])
    v = get("mlp", "bfloat16")
    if v == v:
        rows.append(["MLP overhead, bf16 logs", "<= 1.3x", f"{v:.2f}x",
                     _pf(v <= GOALS["mlp_bf16"])])
    for m, s in speedups.items():
        rows.append([f"{m} vs naive: epoch speedup", ">= 3x", f"{s['epoch']:.1f}x",
                     _pf(s["epoch"] >= GOALS["naive_speedup"])])
        rows.append([f"{m} vs naive: peak memory", "a fraction",
                     f"{s['mem']:.2f} of chunked naive, {s['mem_resident']:.3f} of resident-P",
                     _pf(s["mem"] < 1.0)])
    if worst_storage == worst_storage:
        rows.append(["storage vs rows x dim x size", "within 2%",
                     f"{worst_storage:.3f}% (worst)", _pf(worst_storage <= GOALS["storage_pct"])])
    if not rows:
        return
    print(C.table(["goal", "target", "measured", ""], rows, "== Goals =="))


def _pf(ok):
    return "PASS" if ok else "FAIL"


def report_whatif(res):
    arms = C.pick(res["arms"], res.get("clean", []))
    rows = []
    for name, vals in arms.items():
        walls = [v["wall"] for v in vals]
        if name == "plain":
            rss = max(v.get("rss_peak", float("nan")) for v in vals)
            rows.append([name, C.fmt(C.median(walls)), "", "", "", f"{rss:.0f}", ""])
            continue
        r = _ratios(arms, name)
        rss = max(v.get("rss_peak", float("nan")) for v in res["arms"][name])
        rows.append([name, C.fmt(C.median(walls)), C.fmt(C.median([v["finalize"] for v in vals])),
                     f"{C.median(r):.2f}x", _spread(r), f"{rss:.0f}",
                     res["checks"].get(name, "")])
    print(C.table(["arm (cumulative, fp32 unless noted)", "epoch s", "finalize s",
                   "ratio vs plain", "range", "peak RSS MiB", "logs check"], rows,
                  f"== What-if: recommended changes prototyped by monkeypatching (MLP, "
                  f"threads={res['threads']}, {_rounds_note(res)}) =="))
    print("   shard_rows: a config key (default: flush_threshold / dim = "
          f"{(1 << 26) // 4096} rows here); streaming write: header + tensor bytes written and "
          "hashed\n   in 8 MiB chunks (no serialised copy, GIL released); preallocated buffers: "
          "rows copied into a recycled shard buffer\n   (no per-step copy, no cat per shard); "
          "isfinite via sum: one reduction per step, the exact check only when it fails;\n"
          "   writer at nice +10: the writer thread lowers its own priority; no sha256: the "
          "checksum skipped, to show its cost (not a proposal).\n"
          "   logs check: every shard loads with safetensors, has the manifest's size and "
          "sha256, and LogIX's reader yields all rows.")


def report_profile(prof):
    for res in prof:
        lad = C.pick(res["ladder"], res.get("clean", []))
        names = list(lad)
        med = {n: C.median([x["wall"] for x in lad[n]]) for n in names}
        base = med[names[0]]
        total = med[names[-1]] - base
        rows = []
        prev = base
        for n in names:
            d = med[n] - prev
            rows.append([n, f"{med[n]:.3f}", "" if n == names[0] else f"{d:+.3f}",
                         "" if n == names[0] or total <= 0 else f"{100 * d / total:+.0f}%",
                         C.fmt(C.median([x["ext"] for x in lad[n]]), 2)])
            prev = med[n]
        print(C.table(["variant (cumulative)", "epoch s", "step cost s", "% of overhead",
                       "ext load"], rows,
                      f"== Profile ladder: MLP, {res['params']['dtype']} logs, threads="
                      f"{res['threads']}; each row adds one part of the pipeline; medians, "
                      f"{_rounds_note(res)} =="))
        ins = res.get("instrumented")
        if ins:
            ep = ins["epoch"]["wall"]
            rows = [[k, f"{v:.3f}", f"{100 * v / ep:.1f}%"] for k, v in ins["phases"].items()]
            print(C.table(["phase (writer thread unless noted)", "s per epoch", "% of epoch"],
                          rows, f"-- writer phases, one instrumented epoch ({ep:.2f} s, "
                          f"{ins['shards']} shards of up to {res['rows_per_shard']} rows x "
                          f"{res['dim']}; finalize {ins['finalize']:.2f} s)"))
        if res.get("gil"):
            g = res["gil"]
            print(f"-- GIL probe on one {C.human_bytes(g.get('shard_bytes', 0))} shard: longest "
                  f"training-thread stall while the writer runs: serialise "
                  f"{1e3 * g.get('serialise', 0):.0f} ms, sha256 {1e3 * g.get('sha256', 0):.0f} "
                  f"ms, write+fsync {1e3 * g.get('write+fsync', 0):.0f} ms")
        comp = res.get("components")
        if comp:
            steps = comp["steps"]
            rows_logged = comp.get("rows", steps * res["params"]["batch"])
            shards = rows_logged / comp["rows_per_shard"]  # shard-equivalents of bytes
            plain = comp["per_step_us"]["plain training step (fwd+bwd)"] * steps / 1e6
            rows = []
            for k, v in comp["per_step_us"].items():
                rows.append([k, f"{v:,.0f} us/step", f"{v * steps / 1e6:.3f}",
                             f"{100 * v * steps / 1e6 / plain:.1f}%"])
            for k, v in comp["per_shard_ms"].items():
                rows.append([k, f"{v:,.1f} ms/shard", f"{v * shards / 1e3:.3f}",
                             f"{100 * v * shards / 1e3 / plain:.1f}%"])
            print(C.table(["component (best of repeats)", "cost", "s per epoch",
                           "% of plain epoch"], rows,
                          f"-- components in isolation: {steps} steps, {shards:.2f} shard-sizes of "
                          f"{comp['rows_per_shard']} rows x {comp['dim']} "
                          f"({C.human_bytes(comp['shard_bytes'])}); plain epoch ~{plain:.2f} s"))
        tot = res["cprofile_total"]
        rows = [[r["func"][:90], r["calls"], f"{r['tottime']:.3f}", f"{100 * r['tottime'] / tot:.1f}%"]
                for r in res["cprofile_top"][:18]]
        print(C.table(["function (training thread, writer no-op)", "calls", "tottime s",
                       "% of profiled"], rows, "-- cProfile top functions by own time"))
        rows = [[r["func"][:90], r["calls"], f"{r['cumtime']:.3f}",
                 f"{100 * r['cumtime'] / tot:.1f}%"] for r in res.get("cprofile_logix", [])]
        if rows:
            print(C.table(["LogIX function", "calls", "cumtime s", "% of profiled"], rows,
                          "-- cProfile: LogIX's own functions by inclusive time (training "
                          "thread; cProfile inflates Python-heavy code)"))


# ============================================================================ parent: driver
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes; runs in under a minute")
    ap.add_argument("--profile", action="store_true", help="also profile the logging path")
    ap.add_argument("--whatif", action="store_true",
                    help="also time prototypes of the recommended changes (monkeypatched)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=None, help="override rounds per config")
    ap.add_argument("--threads", default=None,
                    help="comma list of torch threads for the MLP (0 = default); "
                         "default '0,1' ('0' with --quick)")
    ap.add_argument("--skip", default="", help="comma list among: mlp,gpt2,naive,old")
    ap.add_argument("--old-python", default=OLD_PYTHON)
    ap.add_argument("--root", default=None, help="where logs are written (default: a temp dir)")
    ap.add_argument("--p-budget-mb", type=float, default=1024,
                    help="largest dense projection matrix the naive arm may hold")
    ap.add_argument("--max-time", type=float, default=None,
                    help="seconds a configuration may keep adding rounds to find clean ones")
    ap.add_argument("--clean-ext", type=float, default=0.25,
                    help="a round is clean when no epoch saw more than this many cores of "
                         "other processes' load")
    ap.add_argument("--nice", type=int, default=0,
                    help="on a shared machine, run the workers at this nice value (e.g. -20; "
                         "needs root) in their own session so that they get the CPU first")
    ap.add_argument("--json", default=None, help="write raw results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--params", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        params = json.loads(args.params)
        params["priority"] = C.apply_priority(params.get("nice"))
        WORKERS[args.worker](params)
        return

    S = sizes(args.quick)
    skip = set(filter(None, args.skip.split(",")))
    threads = [int(t) for t in (args.threads or ("0" if args.quick else "0,1")).split(",")]
    rounds = dict(S["rounds"])
    if args.rounds:
        rounds = {k: args.rounds for k in rounds}
    if args.nice:  # workers get the CPU first: waiting for a quiet machine is pointless then,
        S["quiet_wait"] = 0.0  # and every round counts
        args.clean_ext = float("inf")
    common = dict(rank=args.rank, root=args.root, quiet_wait=S["quiet_wait"], nice=args.nice,
                  max_time=S["max_time"] if args.max_time is None else args.max_time,
                  clean_ext=args.clean_ext)
    script = os.path.abspath(__file__)
    t0 = time.perf_counter()
    raw = {}

    import platform

    import torch

    print(f"LogIX logging-overhead benchmark ({'quick' if args.quick else 'full'}); python "
          f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads by default), {os.cpu_count()} CPUs; other processes' load at start "
          f"{C.fmt(C.external_load(1.0), 2)} cores; worker priority: "
          f"{'nice ' + str(args.nice) if args.nice else 'normal'}")

    def ours(worker, params, timeout=3600):
        t = time.perf_counter()
        out = C.run_worker(sys.executable, script, worker, params, cwd=REPO, timeout=timeout)
        print(f"    done in {time.perf_counter() - t:.0f} s", flush=True)
        return out

    overhead = []
    dtypes = ["float32", "bfloat16"]
    if "mlp" not in skip:
        for t in threads:
            print(f"... MLP overhead, threads={t or 'default'}", flush=True)
            overhead.append(ours("overhead", dict(S["mlp"], **common, dtypes=dtypes,
                                                  threads=t or None, rounds=rounds["mlp"])))
    if "gpt2" not in skip:
        print("... GPT-2 overhead, threads=default", flush=True)
        overhead.append(ours("overhead", dict(S["gpt2"], **common, dtypes=dtypes, threads=None,
                                              rounds=rounds["gpt2"])))
    naive = []
    if "naive" not in skip:
        for m in ("mlp", "gpt2"):
            if m in skip:
                continue
            print(f"... naive design, {m}", flush=True)
            naive.append(ours("naive", dict(S[m], **common, **S["naive"][m], threads=None,
                                            p_budget_mb=args.p_budget_mb, chunk_mb=256)))
    old = None
    if "old" not in skip:
        if os.path.exists(args.old_python):
            print(f"... LogIX 0.1.1 arm ({args.old_python})", flush=True)
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            try:
                t = time.perf_counter()
                old = C.run_worker(args.old_python, script, "old",
                                   dict(S["mlp"], **common, dtypes=["none", "float16"],
                                        threads=None, rounds=rounds["old"]),
                                   cwd=tempfile.gettempdir(), env=env, timeout=3600)
                print(f"    done in {time.perf_counter() - t:.0f} s", flush=True)
            except Exception as e:  # their package, their failure: report and go on
                print(f"    old LogIX arm failed: {str(e).splitlines()[-1]}")
        else:
            print(f"... LogIX 0.1.1 arm skipped: {args.old_python} not found")
    whatif = []
    if args.whatif:
        for t in threads:
            print(f"... what-if arms, MLP, threads={t or 'default'}", flush=True)
            whatif.append(ours("whatif", dict(S["mlp"], **common, threads=t or None,
                                               rounds=rounds["mlp"], small_shard_rows=2048)))
    prof = []
    if args.profile:
        for t in threads:
            print(f"... profile, MLP fp32 logs, threads={t or 'default'}", flush=True)
            prof.append(ours("profile", dict(S["mlp"], **common, dtype="float32",
                                             threads=t or None, rounds=rounds["profile"])))
    print()
    ratios = report_overhead(overhead) if overhead else {}
    print()
    worst = report_storage(overhead) if overhead else float("nan")
    print()
    speedups = report_naive(naive, overhead) if naive else {}
    print()
    raw_old = report_old(old, ratios)
    if raw_old is not None:
        print()
    report_goals(ratios, speedups, worst, naive)
    for w in whatif:
        print()
        report_whatif(w)
    if prof:
        print()
        report_profile(prof)
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    if args.json:
        raw.update(overhead=overhead, naive=naive, old=old, profile=prof, whatif=whatif)
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    main()
