"""Fault suite for the writing side (docs/format.md, "Atomic write protocol" and "One writer at
a time"):

- a torn last line of logs/index-r<rank>.jsonl, cut at every byte, then a resumed run appending
  after it: every committed row stays readable and the log verifies;
- the disk filling up at each write of a small logging run: a WriterError, committed rows
  readable, and a run after space is freed completes the log;
- two processes writing into one project: one is refused naming the holder, or both finish,
  never a lost row; a killed writer's lock is taken over; two Runs of one process likewise;
- two processes describing examples at once: every description survives.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import warnings

import pytest
import torch

from conftest import make_mlp, seeded
from logix.errors import UsageError, WriterError
from logix.storage.content import ContentStore
from logix.storage.reader import LogReader
from logix.storage.verify import verify
from test_reliability import TESTS_DIR, logging_run, step

WORKER = os.path.join(TESTS_DIR, "workers", "concurrent_writer.py")


def logged_ids(project_dir):
    return LogReader(project_dir).read_all()[0]


def assert_verifies(project_dir, context=""):
    report = verify(project_dir)
    assert report.ok, (context, report.errors)


def quietly(fn, *args):
    """Resumed runs warn that they append to a log; that is expected here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


# =========================================================================== torn index line
def test_torn_index_tail_at_every_byte_then_resume_keeps_every_committed_row(new_run, tmp_root):
    """A disk that fills up while the third shard's index line is appended leaves the manifest
    as written before the first shard (no shards) and an index of two lines and a fragment.
    For each length of that fragment, a resumed run appends a shard: the two committed shards
    (and the third when its line is whole but for the newline) and the new one are read, before
    and after the resumed run's finalize."""
    g = seeded(40)
    model = make_mlp(seed=40)
    run = logging_run(new_run, "base", model, shard_rows=2)
    for i in range(3):
        step(run, model, torch.randn(2, 6, generator=g), [f"{i}a", f"{i}b"])
    run.finalize()
    base = os.path.join(tmp_root, "base")
    with open(os.path.join(base, "logs", "index-r0.jsonl"), "rb") as f:
        lines = f.read().splitlines(keepends=True)
    assert len(lines) == 3
    x = torch.randn(2, 6, generator=g)
    new = ["new-a", "new-b"]
    whole = len(lines[2]) - 1  # the line without its newline
    for cut in range(whole + 1):
        project_dir = copy_without_manifest_shards(base, f"cut{cut}", lines[0] + lines[1]
                                                   + lines[2][:cut])
        committed = ["0a", "0b", "1a", "1b"] + (["2a", "2b"] if cut == whole else [])
        assert logged_ids(project_dir) == committed, cut  # the fragment is skipped
        run = logging_run(new_run, f"cut{cut}", model, shard_rows=2)
        quietly(step, run, model, x, new)
        run.flush()  # one more index line: the fragment would no longer be the last line
        assert logged_ids(project_dir) == committed + new, cut
        run.finalize()
        assert logged_ids(project_dir) == committed + new, cut
        assert_verifies(project_dir, cut)
    # Earlier releases appended after the fragment: the line after it is still read.
    project_dir = copy_without_manifest_shards(base, "damaged", lines[0] + lines[1][:25]
                                               + lines[2])
    assert logged_ids(project_dir) == ["0a", "0b", "2a", "2b"]
    assert_verifies(project_dir)


def copy_without_manifest_shards(base: str, name: str, index: bytes) -> str:
    """A copy of the project `base` as its first session left it when it stopped before
    finalize: the manifest names no shard (as written before the first one), no statistics were
    saved, and logs/index-r0.jsonl holds `index`."""
    project_dir = os.path.join(os.path.dirname(base), name)
    shutil.copytree(base, project_dir)
    os.remove(os.path.join(project_dir, "state", "statistics.safetensors"))
    with open(os.path.join(project_dir, "manifest.json")) as f:
        manifest = json.load(f)
    manifest["shards"], manifest["rows"] = [], 0
    with open(os.path.join(project_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with open(os.path.join(project_dir, "logs", "index-r0.jsonl"), "wb") as f:
        f.write(index)
    return project_dir


# =========================================================================== disk full
class DiskFull:
    """Counts every write into files below `folder`, through os.write or a file object from
    open(). The `at`-th write stores half its bytes and raises ENOSPC, and so does every later
    write (nothing stored) until the patches are undone (space freed)."""

    def __init__(self, monkeypatch, folder: str, at=None) -> None:
        self.folder, self.at, self.count, self.full = os.path.abspath(folder), at, 0, False
        self._lock = threading.Lock()  # the writer thread writes too
        real_write, real_open = os.write, builtins.open

        def write(fd, data):
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                path = ""
            if not self.ours(path):
                return real_write(fd, data)
            return self.write(data, lambda part: real_write(fd, part))

        def open_(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+") \
                    and self.ours(os.path.abspath(file)):
                return _CountedFile(f, self)
            return f

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(builtins, "open", open_)

    def ours(self, path: str) -> bool:
        return path.startswith(self.folder + os.sep)

    def write(self, data, real):
        with self._lock:
            self.count += 1
            hit = self.count == self.at
            if hit:
                view = memoryview(data).cast("B")
                real(view[:len(view) // 2])
            if hit or self.full:
                self.full = True
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(data)


class _CountedFile:
    def __init__(self, f, disk: DiskFull) -> None:
        self._f, self._disk = f, disk

    def write(self, data):
        def real(part):
            n = self._f.write(part)
            self._f.flush()
            return n

        return self._disk.write(data, real)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._f, name)


def test_disk_full_at_every_write_keeps_committed_rows_and_a_rerun_completes(
        new_run, tmp_root, monkeypatch):
    """For each write k of a small logging run (three steps, shards of two rows), the disk
    fills up at write k: the run fails with a WriterError saying so, what it committed is
    readable and verifies, and the same run again, with space freed, leaves every row logged
    once in a log that verifies."""
    g = seeded(41)
    model = make_mlp(seed=41)
    batches = [(torch.randn(3, 6, generator=g), [f"{i}-{k}" for k in range(3)])
               for i in range(3)]
    every = sorted(i for _, ids in batches for i in ids)

    def log_all(project):
        run = logging_run(new_run, project, model, shard_rows=2)
        try:
            for x, ids in batches:
                quietly(step, run, model, x, ids)
        finally:
            run.finalize()

    counting = DiskFull(monkeypatch, os.path.join(tmp_root, "clean"))
    log_all("clean")
    monkeypatch.undo()
    assert counting.count >= 10 and sorted(logged_ids(os.path.join(tmp_root, "clean"))) == every
    for at in range(1, counting.count + 1):
        project, project_dir = f"full{at}", os.path.join(tmp_root, f"full{at}")
        DiskFull(monkeypatch, project_dir, at)
        with pytest.raises(WriterError, match="No space left on device"):
            log_all(project)
        monkeypatch.undo()  # space freed
        if os.path.isfile(os.path.join(project_dir, "manifest.json")):
            ids = logged_ids(project_dir)
            assert len(set(ids)) == len(ids) and set(ids) <= set(every), at
            assert_verifies(project_dir, at)
        log_all(project)
        assert sorted(logged_ids(project_dir)) == every, at
        assert_verifies(project_dir, at)


# =========================================================================== concurrent writers
def readline(proc, timeout: float = 120) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"worker {proc.pid} silent for {timeout} s"
    return proc.stdout.readline().strip()


def start_workers(mode: str, root: str, project: str, jobs):
    """One worker per (prefix, n) of `jobs`, released together once all have imported."""
    procs = [subprocess.Popen([sys.executable, WORKER, mode, root, project, prefix, str(n)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for prefix, n in jobs]
    try:
        for proc in procs:
            assert readline(proc) == "ready"
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
    except BaseException:
        for proc in procs:
            proc.kill()
            proc.wait()
        raise
    return procs


def finish(proc, timeout: float = 120):
    """(exit status, stderr) of a worker."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, err


def test_two_processes_logging_into_one_project_lose_nothing(tmp_root):
    """Started together with disjoint ids: a writer that is refused says which process holds
    the project; the rows of every writer that finished are all in the log."""
    jobs = [("a", 300), ("b", 300)]
    procs = start_workers("log", tmp_root, "p", jobs)
    outcomes = [finish(proc) for proc in procs]
    for (code, err), other in zip(outcomes, reversed(procs)):
        assert code in (0, 3), err
        if code == 3:
            assert f"pid {other.pid}" in err and "is writing to" in err, err
    finished = [job for job, (code, _) in zip(jobs, outcomes) if code == 0]
    assert finished
    project_dir = os.path.join(tmp_root, "p")
    ids = logged_ids(project_dir)
    assert sorted(ids) == sorted(f"{prefix}{i}" for prefix, n in finished for i in range(n))
    assert_verifies(project_dir)


def test_a_live_writer_is_named_and_a_killed_writers_lock_is_taken_over(new_run, tmp_root):
    """A worker logs 20 rows, flushes and waits: a run here is refused, naming it. Once the
    worker is SIGKILLed (no finalize), the run takes its lock over with a warning, and the log
    holds the worker's flushed rows and the run's."""
    worker = start_workers("hold", tmp_root, "p", [("w", 20)])[0]
    try:
        assert readline(worker) == "flushed"
        model = make_mlp(seed=0)  # the worker's model
        x = torch.randn(2, 6, generator=seeded(42))
        run = logging_run(new_run, "p", model, shard_rows=7)
        with pytest.raises(UsageError, match=f"pid {worker.pid} on host .* is writing to"):
            quietly(step, run, model, x, ["t0", "t1"])
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.communicate()
    with pytest.warns(UserWarning, match=f"pid {worker.pid} .* without finalize"):
        step(run, model, x, ["t0", "t1"])
    run.finalize()
    project_dir = os.path.join(tmp_root, "p")
    assert logged_ids(project_dir) == [f"w{i}" for i in range(20)] + ["t0", "t1"]
    assert_verifies(project_dir)


def test_two_runs_of_one_process_take_turns(new_run, tmp_root):
    """A Run with rows to write keeps the project; once it has none (flushed), a second Run
    takes over, and the first may not write again (its view of the log is stale); nor may a
    finalized Run after another appended."""
    g = seeded(43)
    model = make_mlp(seed=43)
    first = logging_run(new_run, "p", model)
    step(first, model, torch.randn(2, 6, generator=g), ["a", "b"])
    second = logging_run(new_run, "p", model)
    with pytest.raises(UsageError, match="another Run of this process is writing to"):
        step(second, model, torch.randn(2, 6, generator=g), ["c", "d"])
    first.flush()
    quietly(step, second, model, torch.randn(2, 6, generator=g), ["c", "d"])
    with pytest.raises(UsageError, match="took over"):
        step(first, model, torch.randn(2, 6, generator=g), ["e", "f"])
    second.finalize()
    project_dir = os.path.join(tmp_root, "p")
    assert logged_ids(project_dir) == ["a", "b", "c", "d"]
    assert_verifies(project_dir)
    # A run that finalized and logs again, after another run appended since: refused too.
    third = logging_run(new_run, "p", model)
    quietly(step, third, model, torch.randn(2, 6, generator=g), ["e", "f"])
    third.finalize()
    with pytest.raises(UsageError, match="wrote to .* after this run's finalize"):
        step(second.save(True), model, torch.randn(2, 6, generator=g), ["g", "h"])
    assert logged_ids(project_dir) == ["a", "b", "c", "d", "e", "f"]
    assert_verifies(project_dir)


def test_two_processes_describing_at_once_keep_every_description(tmp_root):
    procs = start_workers("describe", tmp_root, "p", [("a", 50), ("b", 50)])
    for proc in procs:
        code, err = finish(proc)
        assert code == 0, err
    store = ContentStore(os.path.join(tmp_root, "p"))
    assert not store.errors
    ids = [f"{prefix}{i}" for prefix in "ab" for i in range(50)]
    assert len(store) == 100 and all(store.get(i)["text"] == f"text {i[1:]}" for i in ids)
    assert re.fullmatch(r"content-r0-\d{6}\.safetensors",
                        sorted(os.listdir(os.path.join(tmp_root, "p", "content")))[-1])
