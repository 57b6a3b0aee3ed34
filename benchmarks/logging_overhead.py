"""Logging overhead of LogIX at train time, against the naive design and against LogIX 0.1.1.

    python benchmarks/logging_overhead.py [--quick] [--profile] [--nice -20] [--json out.json]

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
* Old LogIX (optional): the same MLP logged with LogIX 0.1.1 by the python of a venv that has it
  (--old-python PATH; benchmarks/quality.py --make-peer-venv PATH builds one), in a subprocess;
  skipped cleanly without it.
* --profile: where the logging time goes on the MLP (fp32 logs, each thread setting): a ladder
  of epochs that adds one part of the logging path per rung (hooks + start()/end(); the append
  copy into the shard buffer; header + streaming write + checksum; fsync), one epoch with timers
  on those calls (wall and CPU time per thread), and each piece timed alone.

The machine may be shared: every epoch records other processes' CPU use ("ext", in cores), the
harness waits for a quiet moment before each timed epoch, and the tables show the spread.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import _common as C  # noqa: E402  (stdlib only at import time)


GOALS = {"mlp_fp32": 1.3, "mlp_bf16": 1.15, "naive_speedup": 3.0, "storage_pct": 2.0}


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
# Each rung adds one part of the logging path: (save rows, write shards, fsync).
LADDER = {"plain": None,
          "hooks + start()/end(), save(False)": (False, True, True),
          "+ append rows to the shard buffer": (True, False, True),
          "+ header, streaming write, checksum": (True, True, False),
          "+ fsync (full logging)": (True, True, True)}


def _no_write(self, *args):  # ShardWriter._write stand-in: the buffer goes round, no disk
    return None


def _no_fsync(fd):
    return None


@contextlib.contextmanager
def _patched(*changes):
    """Set (object, attribute, value) for the duration of the block."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in changes]
    for obj, name, value in changes:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


class _Timers:
    """Wall and CPU time of wrapped calls, summed per (label, thread)."""

    def __init__(self):
        self.stats, self._lock = {}, threading.Lock()

    def wrap(self, label, fn):
        def timed(*args, **kwargs):
            w, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                wall, cpu = time.perf_counter() - w, time.thread_time() - c
                thread = "writer" if threading.current_thread().name == "logix-writer" \
                    else "training"
                with self._lock:
                    s = self.stats.setdefault(f"{label}|{thread}", [0, 0.0, 0.0])
                    s[0], s[1], s[2] = s[0] + 1, s[1] + wall, s[2] + cpu
        return timed


def _best(fn, repeats, inner=1):
    """Smallest time of `repeats` runs of fn (x inner), per call: a busy machine only adds."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t) / inner)
    return best


def _gil_stall(fn):
    """Longest gap of a pure-Python loop in this thread while fn runs in another thread."""
    done, gaps = threading.Event(), []
    th = threading.Thread(target=lambda: (fn(), done.set()))
    last = time.perf_counter()
    th.start()
    while not done.is_set():
        sum(range(100))
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    th.join()
    return max(gaps, default=0.0)


def worker_profile(p):
    """Where the logging time goes: MLP, one log dtype, one thread setting."""
    import torch

    import logix.run as R
    import logix.storage.session as S
    import logix.storage.writer as W

    C.set_threads(p.get("threads"))
    model, batches, loss_fn, name_filter = _setup_data(p)
    opt = torch.optim.SGD(model.parameters(), lr=p["lr"])
    root = tempfile.mkdtemp(prefix="logix-bench-prof-", dir=p.get("root"))
    counter = [0]
    timed = [  # (object, attribute, label) timed in the instrumented epoch; indent = nested
        (R.Run, "start", "start(): attach hooks"),
        (R.Run, "end", "end(), all of it"),
        (W.ShardWriter, "append", "  append: rows into the shard buffer"),
        (W.ShardWriter, "_submit", "    _submit: queue a full buffer (waits while full)"),
        (W.ShardWriter, "_write", "_write: one shard, all of it"),
        (W, "safetensors_header", "  header"),
        (W, "write_shard", "  write_shard: O_DIRECT write + xxh3 + fsync + rename"),
        (S.LogSession, "_on_shard", "  manifest update"),
        (os, "fsync", "fsync, every call (shard, folder, manifest, state)")]

    def epoch(name, timers=None):
        spec, run, changes = LADDER.get(name, (True, True, True)), None, []
        if spec is not None:
            save, write, fsync = spec
            if timers is not None:
                changes = [(obj, attr, timers.wrap(label, getattr(obj, attr)))
                           for obj, attr, label in timed]
            changes += [(W.ShardWriter, "_write", _no_write)] if not write else []
            changes += [(os, "fsync", _no_fsync)] if not fsync else []
            counter[0] += 1
            run = _new_run(f"p{counter[0]}", root, model, name_filter, p["rank"], p["dtype"])
            run.save(save)
        C.quiesce(p["quiet_wait"])
        with _patched(*changes), C.Measure() as m:
            _train_epoch(model, opt, batches, loss_fn, run)
            t = time.perf_counter()
            if run is not None:
                run.finalize()
            fin = time.perf_counter() - t
        if run is not None:
            _close_run(run)
            shutil.rmtree(os.path.join(root, f"p{counter[0]}"), ignore_errors=True)
        return dict(m.as_dict(), finalize=fin)

    for name in LADDER:  # warm-up
        epoch(name)
    ladder, clean = C.interleaved(list(LADDER), epoch, p["rounds"], p["max_time"],
                                  p["clean_ext"])
    timers = _Timers()
    instrumented = epoch("instrumented", timers)
    components = _components(p, model, opt, batches, loss_fn, name_filter, root)
    shutil.rmtree(root, ignore_errors=True)
    C.emit(dict(params=p, ladder=ladder, clean=clean, instrumented=instrumented,
                timers=timers.stats, timed=[t[2] for t in timed], components=components,
                threads=torch.get_num_threads()))


def _components(p, model, opt, batches, loss_fn, name_filter, root):
    """Each piece of the logging path alone, best of many repeats (so other processes' load
    mostly drops out): per step in microseconds, per shard in milliseconds."""
    import zlib

    import torch

    import logix.storage.format as F
    from logix.storage.direct_io import PAGE, aligned_empty, write_shard
    from logix.storage.writer import ShardWriter

    run = _new_run("components", root, model, name_filter, p["rank"], p["dtype"])
    run.save(False)
    ids, x, y = batches[0]
    reps = p.get("component_repeats", 30)

    def plain_step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model, x, y).backward()

    def hooked_step():
        run.start(data_id=ids)
        plain_step()
        run.end()

    for _ in range(3):
        plain_step()
        hooked_step()
    rows = run.get_log().grads  # [batch, dim] float32, as end() hands it to the writer
    dim = rows.shape[1]
    cfg = run.config.logging
    rps = cfg.shard_rows or max(1, cfg.flush_threshold // dim)
    per_step = {"training step (zero_grad, forward, backward)": _best(plain_step, reps),
                "same step with hooks + start()/end(), save(False)": _best(hooked_step, reps),
                "  NaN check in end(): math.isfinite(rows.sum())": _best(
                    lambda: math.isfinite(float(rows.sum())), reps, 20)}
    for dtype in ("float32", "bfloat16"):
        writer = ShardWriter(os.path.join(root, "components"), 0, rps, dim,
                             getattr(torch, dtype), lambda entry: None)
        writer._write = _no_write.__get__(writer)  # full buffers are recycled untouched
        label = "float32, where the hooks cannot write in place" if dtype == "float32" else dtype
        per_step[f"append: copy into the shard buffer ({label})"] = _best(
            lambda: writer.append(ids, rows), reps, 20)
        writer.close()

    shard = aligned_empty(rps, dim, getattr(torch, p["dtype"]))  # as the writer allocates it
    shard.copy_(torch.randn(rps, dim))
    shard_ids = list(range(rps))
    body = F.tensor_bytes(shard)

    def header():
        return F.safetensors_header({"grad": (shard.dtype, tuple(shard.shape))},
                                    {"data_ids": json.dumps(shard_ids)}, align=PAGE)

    path = os.path.join(root, "component.safetensors")
    sr = max(3, min(8, reps // 4))
    per_shard = {"header (json.dumps of the ids + safetensors_header)": _best(header, sr),
                 "xxh3 of the shard alone (the checksum)": _best(
                     lambda: F.new_digest(F.CHECKSUM).update(body), sr),
                 "crc32 of the shard alone (previous release)": _best(
                     lambda: zlib.crc32(body), sr)}
    with _patched((os, "fsync", _no_fsync)):
        per_shard["atomic_write with fsync off (page cache + xxh3)"] = _best(
            lambda: F.atomic_write(path, header(), body), sr)
    per_shard["atomic_write (+ fsync of file and folder, rename)"] = _best(
        lambda: F.atomic_write(path, header(), body), sr)
    per_shard["write_shard (O_DIRECT, + fsync and rename), what the writer runs"] = _best(
        lambda: write_shard(path, header(), body), sr)
    stall = _gil_stall(lambda: write_shard(path, header(), body))
    return dict(per_step_us={k: v * 1e6 for k, v in per_step.items()},
                per_shard_ms={k: v * 1e3 for k, v in per_shard.items()},
                gil_stall_ms=stall * 1e3, steps=len(batches),
                rows=sum(len(b[0]) for b in batches), rows_per_shard=rps, dim=dim,
                shard_bytes=len(header()) + len(body))


WORKERS = {"overhead": worker_overhead, "naive": worker_naive, "old": worker_old,
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
        # logging cost only: meaningless when noise makes the logged epoch no slower than plain
        extra = ((epoch - L["plain"]) / (L["log"] - L["plain"])
                 if L and L["log"] > L["plain"] else float("nan"))
        resident = res["rss_peak_mb"] + (res["p_full_bytes"] - res["p_resident_bytes"]) / 2**20
        speedups[m] = dict(epoch=sp, extra=extra,
                           mem=(L["rss"] / res["rss_peak_mb"]) if L else float("nan"),
                           mem_resident=(L["rss"] / resident) if L else float("nan"))
        note = (f"{res['col_blocks_timed']}/{res['col_blocks']} col blocks timed, scaled"
                if res["col_blocks_timed"] < res["col_blocks"] else "all col blocks timed")
        rows.append([m, res["k"], f"{res['n_params']:,}", f"{tr:.3f}", f"{gr:.3f}", f"{pr:.3f}",
                     f"{epoch:.1f}", C.fmt(L["log"] if L else None, 2), f"{sp:.1f}x",
                     f"{extra:.0f}x" if extra == extra else "n/a",
                     f"{res['rss_peak_mb']:.0f}", f"{resident:,.0f}",
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
        meta = s.get("metadata_bytes", 0) / max(1, s.get("rows", 1))
        ours_dtype = "float32" if dtype in ("none", "float32") else "bfloat16"
        ours = ours_ratios.get(("mlp", ours_dtype, None, False))
        if ours is None:
            ours = next((v for (m, d, t, pinned), v in ours_ratios.items()
                         if m == "mlp" and d == ours_dtype and not pinned), None)
        out[dtype] = dict(theirs=r, ours=ours)
        rows.append(["LogIX 0.1.1", arm, C.fmt(C.median(walls)),
                     f"{r:.2f}x", f"{per_ex:,.0f} (meta {meta:,.0f})",
                     f"{ours:.2f}x ({ours_dtype})" if ours else "n/a",
                     f"{ours / r:.2f} / {(ours - 1) / max(1e-9, r - 1):.2f}" if ours else "n/a"])
    print(C.table(["library", "arm", "epoch s", "ratio vs plain", "B/example on disk",
                   "ours (same MLP)", "ours/theirs: ratio / extra time"], rows,
                  f"== Old LogIX {old.get('version')} on the same MLP (its own subprocess and "
                  "plain baseline) =="))
    print(f"   {_rounds_note(old)}; peak RSS {old['rss_peak_mb']:.0f} MiB.")
    print("   LogIX 0.1.1 inserts LoRA modules (A, zero B, C) into the model and logs B's "
          "gradient; "
          "its watch() freezes untracked weights, which this benchmark unfreezes so that both\n"
          "   arms still train. Both track the same 4 body layers (rank 32: 4096 numbers per "
          "example).\n   bfloat16 logs crash in 0.1.1 (numpy has no bf16), so its "
          "half-precision arm is float16.")
    return out


def report_goals(ratios, speedups, worst_storage, naive):
    def get(model, dtype):
        return next((v for (m, d, t, pinned), v in ratios.items()
                     if m == model and d == dtype and not pinned), float("nan"))

    rows = []
    v = get("mlp", "float32")
    if v == v:
        rows.append(["MLP overhead, fp32 logs", f"<= {GOALS['mlp_fp32']}x", f"{v:.2f}x",
                     _pf(v <= GOALS["mlp_fp32"])])
    v = get("mlp", "bfloat16")
    if v == v:
        rows.append(["MLP overhead, bf16 logs", f"<= {GOALS['mlp_bf16']}x", f"{v:.2f}x",
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


def report_profile(prof):
    def thr(res):
        return f"{res['threads']} thr"

    lad = [C.pick(res["ladder"], res.get("clean", [])) for res in prof]
    med = [{n: C.median([x["wall"] for x in arms[n]]) for n in arms} for arms in lad]
    rows, names = [], list(lad[0])
    for i, n in enumerate(names):
        row = [n]
        for m in med:
            total = m[names[-1]] - m[names[0]]
            d = m[n] - m[names[i - 1]] if i else None
            row += [f"{m[n]:.3f}", "" if d is None else f"{d:+.3f}",
                    "" if d is None or total <= 0 else f"{100 * d / total:+.0f}%"]
        rows.append(row)
    heads = ["rung (each adds one part)"]
    for res in prof:
        heads += [f"epoch s, {thr(res)}", "added s", "of overhead"]
    notes = "; ".join(f"{thr(r)}: {_rounds_note(r)}" for r in prof)
    print(C.table(heads, rows, f"== Profile ladder: MLP, {prof[0]['params']['dtype']} logs, "
                  f"median epoch (incl. finalize) over interleaved rounds ({notes}) =="))
    print("   fsync off: os.fsync is a no-op in that rung, so the pages reach the disk after the "
          "epoch (os.sync between epochs).")

    for res, m in zip(prof, med):
        ins, plain = res["instrumented"], m["plain"]
        ep = ins["wall"]
        rows = []
        order = {label: i for i, label in enumerate(res["timed"])}
        for key, (calls, wall, cpu) in sorted(res["timers"].items(), key=lambda kv: (
                order.get(kv[0].split("|")[0], 99), kv[0])):
            label, thread = key.split("|")
            rows.append([label, thread, calls, f"{wall:.3f}", f"{cpu:.3f}",
                         f"{100 * wall / ep:.1f}%"])
        rows.append(["finalize() (final shard, state, manifest)", "training", 1,
                     f"{ins['finalize']:.3f}", "", f"{100 * ins['finalize'] / ep:.1f}%"])
        print()
        print(C.table(["call (indent: inside the row above)", "thread", "calls", "wall s",
                       "thread CPU s", "% of epoch"], rows,
                      f"-- {thr(res)}: one instrumented full-logging epoch, {ep:.2f} s "
                      f"(plain {plain:.2f} s, process CPU {ins['cpu']:.2f} s, others' cores "
                      f"{C.fmt(ins['ext'], 2)})"))
        s = res["timers"]
        inside = sum(s.get(f"{k}|training", [0, 0.0])[1]
                     for k in ("start(): attach hooks", "end(), all of it")) + ins["finalize"]
        print(f"   overhead {ep - plain:+.2f} s = start()/end()/finalize() on the training "
              f"thread {inside:.2f} s + the rest {ep - plain - inside:+.2f} s (hooks inside "
              "forward/backward, and compute slowed by the writer thread)")

    comp = prof[0]["components"]
    steps, shards = comp["steps"], comp["rows"] / comp["rows_per_shard"]
    rows = []
    for k in comp["per_step_us"]:
        vals = [r["components"]["per_step_us"][k] for r in prof]
        rows.append([k, "step"] + [f"{v:,.0f} us ({v * steps / 1e6:.3f} s)" for v in vals])
    for k in comp["per_shard_ms"]:
        vals = [r["components"]["per_shard_ms"][k] for r in prof]
        rows.append([k, "shard"] + [f"{v:,.1f} ms ({v * shards / 1e3:.3f} s)" for v in vals])
    print()
    print(C.table(["piece (best of repeats)", "per"] + [f"cost (per epoch), {thr(r)}"
                                                       for r in prof], rows,
                  f"-- pieces alone: {steps} steps and {shards:.2f} shard-sizes per epoch; a "
                  f"shard is {comp['rows_per_shard']} rows x {comp['dim']} "
                  f"({C.human_bytes(comp['shard_bytes'])})"))
    print("   longest stall of a Python loop while another thread runs write_shard on one "
          "shard (the GIL): " + ", ".join(f"{r['components']['gil_stall_ms']:.1f} ms ({thr(r)})"
                                          for r in prof))


# ============================================================================ parent: driver
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="small sizes (about a minute on a quiet machine)")
    ap.add_argument("--profile", action="store_true", help="also profile the logging path")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=None, help="override rounds per config")
    ap.add_argument("--threads", default=None,
                    help="comma list of torch threads for the MLP (0 = default); "
                         "default '0,1' ('0' with --quick)")
    ap.add_argument("--skip", default="", help="comma list among: mlp,gpt2,naive,old")
    ap.add_argument("--old-python", default=None,
                    help="python of a venv with logix-ai 0.1.1 (the peer arm; skipped without it)")
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
        if args.old_python and os.path.exists(args.old_python):
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
            print(f"... LogIX 0.1.1 arm skipped: no --old-python (got {args.old_python!r})")
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
    if prof:
        print()
        report_profile(prof)
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    if args.json:
        raw.update(overhead=overhead, naive=naive, old=old, profile=prof)
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    main()
