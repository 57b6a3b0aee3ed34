"""Reliability, proven by fault tests (DESIGN.md section 5; STYLE.md: the writer owns its copies
and reports its failures, reopening checks what it reopens).

- Crash safety: a logging process is SIGKILLed at random moments (mid-write, between writes,
  inside finalize, while resuming); every shard the manifest names stays readable, `logix
  verify` passes, and only rows that were not yet flushed are missing.
- Resume: a reopened project appends shards with new sequence numbers, skips or refuses ids it
  already holds, and refuses a different model, module set, rank or dtype.
- Writer faults (disk full, permission denied, a failed manifest update) reach the user's
  thread as WriterError at the next end() / flush() / finalize(), naming the rows not written.
- Bad input that other test files do not cover yet (the comment opening that section lists
  where the rest is covered).
- A hypothesis round trip over batch sizes, shard sizes, dtypes and flush points.
- Thread safety: get_log() and logging while the writer thread is busy; two runs at once.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import logix
import logix.storage.writer as writer_module
from conftest import make_mlp, seeded
from logix import cli
from logix.errors import LogFormatError, UsageError, WriterError
from logix.storage.format import DTYPES, TMP_SUFFIX, parse_shard_name
from logix.storage.manifest import Manifest
from logix.storage.reader import LogReader

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
CRASH_WORKER = os.path.join(TESTS_DIR, "workers", "crash_logger.py")


def step(run, model, x, ids):
    """One logged step of `model` on inputs x [B, in] with a summed squared loss."""
    with run(data_id=ids):
        model(x).pow(2).sum().backward()
    return run.get_log()


def verify(project_dir) -> int:
    return cli.main(["verify", str(project_dir)])


def shard_files(project_dir):
    logs = os.path.join(project_dir, "logs")
    return sorted(f for f in os.listdir(logs) if parse_shard_name(f)) if os.path.isdir(logs) \
        else []


def tmp_files(project_dir):
    return sorted(os.path.relpath(os.path.join(d, f), project_dir)
                  for d, _, files in os.walk(project_dir) for f in files
                  if f.endswith(TMP_SUFFIX))


# =========================================================================== crash safety
BATCH, SHARD_ROWS, QUEUE_SIZE, FINALIZE_EVERY = 4, 3, 2, 4
# Rows that can still be in memory when a step's end() returns: a partial shard (< SHARD_ROWS
# rows), QUEUE_SIZE shards in the queue and one in the writer's hands. With BATCH >= SHARD_ROWS - 1
# this is within the bound rows_per_shard * (queue_size + 1) + batch.
UNFLUSHED_BOUND = SHARD_ROWS * (QUEUE_SIZE + 1) + SHARD_ROWS - 1
assert UNFLUSHED_BOUND <= SHARD_ROWS * (QUEUE_SIZE + 1) + BATCH
KILLS = int(os.environ.get("LOGIX_CRASH_KILLS", 12))  # more for a soak run


class CrashServer:
    """tests/workers/crash_logger.py: imports torch once, forks one logging child per attempt."""

    def __init__(self, root: str, project: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, CRASH_WORKER, root, project, str(BATCH), str(SHARD_ROWS),
             str(QUEUE_SIZE), str(FINALIZE_EVERY)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.child = None  # the pid of a child not yet reaped
        assert self.readline(120) == "ready"

    def readline(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"crash worker silent for {timeout} s"
        line = self.proc.stdout.readline()
        assert line, f"crash worker exited with {self.proc.wait()}"
        return line.strip()

    def fork(self, attempt: int) -> int:
        self.proc.stdin.write(f"{attempt}\n")
        self.proc.stdin.flush()
        self.child = int(self.readline(30))
        return self.child

    def reaped(self) -> int:
        """Wait for the child's end: its signal number, or minus its exit code."""
        exit_line = self.readline(60).split()
        assert exit_line[:2] == ["exit", str(self.child)], exit_line
        self.child = None
        return int(exit_line[2])

    def close(self) -> None:
        if self.child is not None:  # a failed check must not leave a logging child behind
            try:
                os.kill(self.child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def read_progress(path: str):
    """(rows whose end() returned, rows finalize() guaranteed, last line) of one attempt."""
    completed = finalized = 0
    last = ""
    if os.path.isfile(path):
        for line in open(path).read().splitlines():
            kind, _, value = line.partition(" ")
            if kind == "s":
                completed = int(value)
            elif kind == "F":
                finalized = int(value)
            last = line
    return completed, finalized, last


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_only_unflushed_rows(tmp_path, capsys):
    """Kill a logging process KILLS times (one project folder: each attempt also resumes the
    log of the ones before). After every kill: each shard the manifest names is complete and
    verified, leftover *.tmp files are never named, old shards are untouched, and this
    attempt's ids on disk are exactly a prefix of the ids it logged, missing at most
    UNFLUSHED_BOUND rows that end() had returned."""
    root = str(tmp_path)
    project_dir = os.path.join(root, "crash")
    rng = random.Random(int(os.environ.get("LOGIX_CRASH_SEED", 1234)))
    server = CrashServer(root, "crash")
    stats = {"tried": 0, "killed": 0, "finished": 0, "survived": 0, "in_finalize": 0,
             "mid_write": 0, "before_first_step": 0, "lost": []}
    prev_shards, prev_ids = [], []
    try:
        for attempt in range(KILLS):
            pid = server.fork(attempt)
            progress = os.path.join(root, f"progress-{attempt}.txt")
            time.sleep(rng.uniform(0.02, 0.6))
            stats["tried"] += 1
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            how = server.reaped()
            assert how in (signal.SIGKILL, 0), f"attempt {attempt}: child ended with {how}"
            completed, finalized, last = read_progress(progress)
            stats["killed" if how == signal.SIGKILL else "finished"] += 1
            stats["in_finalize"] += last.startswith("f ")
            stats["before_first_step"] += completed == 0
            leftovers = tmp_files(project_dir) if os.path.isdir(project_dir) else []
            stats["mid_write"] += bool(leftovers)

            if not os.path.isfile(os.path.join(project_dir, "manifest.json")):
                assert attempt == 0 and completed == 0 and not prev_shards
                stats["survived"] += 1  # killed before the log existed: nothing to lose
                continue
            manifest = Manifest.load(project_dir)
            # Old shards are named exactly as before (same file, size, checksum) and first.
            assert manifest.shards[:len(prev_shards)] == prev_shards
            seqs = [s.seq for s in manifest.shards]
            assert seqs == sorted(set(seqs))
            for shard in manifest.shards:
                assert not shard.file.endswith(TMP_SUFFIX)
                assert os.path.isfile(os.path.join(project_dir, shard.file))
            ids, rows = LogReader(project_dir, manifest).read_all()
            assert rows.shape == (len(ids), manifest.dim) and bool(torch.isfinite(rows).all())
            assert len(set(ids)) == len(ids)
            assert verify(project_dir) == 0, capsys.readouterr().out

            assert ids[:len(prev_ids)] == prev_ids
            mine = ids[len(prev_ids):]
            assert mine == [f"a{attempt}-{i}" for i in range(len(mine))], \
                f"attempt {attempt}: not a prefix of the logged ids: {mine[:8]}..."
            assert finalized <= len(mine) <= completed + BATCH
            lost = max(completed - len(mine), 0)
            assert lost <= UNFLUSHED_BOUND, (attempt, completed, len(mine))
            if how == 0:
                assert len(mine) == completed  # a child that finished lost nothing
            stats["lost"].append(lost)
            stats["survived"] += 1
            prev_shards, prev_ids = list(manifest.shards), ids
    finally:
        server.close()
    # The log is still good for a plain in-process resume: new shards get new numbers.
    before = shard_files(project_dir)
    model = make_mlp(in_dim=4, hidden=6, out_dim=3)  # the worker's layer shapes
    run = logix.init("crash", root_dir=root, rank=2, shard_rows=SHARD_ROWS)
    run.watch(model).add_lora().setup({"grad": ["log"]}).save(True)
    step(run, model, torch.randn(BATCH, 4), [f"after-{i}" for i in range(BATCH)])
    run.finalize()
    after = shard_files(project_dir)
    assert after[:len(before)] == before and len(after) > len(before)
    new_seqs = [parse_shard_name(f)[1] for f in after[len(before):]]
    assert min(new_seqs) > max([parse_shard_name(f)[1] for f in before], default=-1)
    ids, _ = LogReader(project_dir).read_all()
    assert ids == prev_ids + [f"after-{i}" for i in range(BATCH)]
    assert verify(project_dir) == 0
    with capsys.disabled():
        print(f"\n[crash] kills tried {stats['tried']}, killed {stats['killed']}, finished "
              f"{stats['finished']}, survived (log verified) {stats['survived']}; in finalize "
              f"{stats['in_finalize']}, with a partial *.tmp {stats['mid_write']}, before the "
              f"first step {stats['before_first_step']}; rows lost per kill {stats['lost']} "
              f"(bound {UNFLUSHED_BOUND}); rows on disk {len(prev_ids)}")
    assert stats["survived"] == stats["tried"] and stats["killed"] >= KILLS // 2


# =========================================================================== resume
def logging_run(new_run, project, model, rank=2, name_filter=None, setup=None, **overrides):
    run = new_run(project, **overrides)
    run.watch(model, name_filter=name_filter).add_lora(rank=rank)
    return run.setup(setup or {"grad": ["log"]}).save(True)


def test_resume_skips_or_refuses_ids_already_logged(new_run, tmp_root):
    """Beyond tests/test_storage.py::test_resumed_run_skips_or_refuses_ids_already_logged: a
    second epoch in the same run is skipped too; a refused step ('error') writes nothing, not
    even its new ids, and leaves the statistics untouched; the run goes on after it."""
    g = seeded(20)
    model = make_mlp(seed=20)
    xs = [torch.randn(3, 6, generator=g) for _ in range(3)]
    run = logging_run(new_run, "dup", model, shard_rows=2, setup={"grad": ["log", "covariance"]})
    step(run, model, xs[0], ["a", "b", "c"])
    with pytest.warns(UserWarning, match=r"Skipped 2 rows whose data ids are already logged"):
        step(run, model, xs[1], ["b", "c", "d"])  # a second epoch over b, c, with one new id
    run.finalize()
    project_dir = os.path.join(tmp_root, "dup")
    assert LogReader(project_dir).read_all()[0] == ["a", "b", "c", "d"]

    run = logging_run(new_run, "dup", model, shard_rows=2, on_duplicate="error",
                      setup={"grad": ["log", "covariance"]})
    step(run, model, xs[2], ["e", "f", "g"])
    counts = dict(run.statistics.counts)
    with pytest.raises(UsageError, match=r"data ids \['a'\] are already in this log.*"
                                         r"nothing of this step was written"):
        step(run, model, xs[0], ["x", "a", "y"])
    assert dict(run.statistics.counts) == counts  # the refused step left no trace
    step(run, model, xs[1], ["x", "y", "z"])  # the run goes on; x and y were not taken
    run.finalize()
    assert LogReader(project_dir).read_all()[0] == list("abcdefgxyz")
    assert verify(project_dir) == 0


@pytest.mark.parametrize("change", ["model", "module_set"])
def test_resume_refuses_a_different_model_or_module_set(new_run, tmp_root, change):
    """Rank, dtype and seed changes: tests/test_storage.py::test_incompatible_run_refuses_to_
    append. Here a model of other layer shapes, and other watched modules."""
    g = seeded(21)
    model = make_mlp(seed=21)
    run = logging_run(new_run, "strict", model, shard_rows=2)
    step(run, model, torch.randn(3, 6, generator=g), [0, 1, 2])
    run.finalize()
    project_dir = os.path.join(tmp_root, "strict")
    before = (shard_files(project_dir), open(os.path.join(project_dir, "manifest.json")).read())
    if change == "model":  # same names and ranks, other shapes
        other, name_filter, expect = make_mlp(in_dim=7, seed=21), None, "'0': in_dim 7 vs 6"
    else:
        other, name_filter, expect = model, ["2"], r"modules \['2'\] vs \['0', '2'\] on disk"
    run = logging_run(new_run, "strict", other, name_filter=name_filter)
    x = torch.randn(3, other[0].in_features, generator=g)
    with pytest.raises(LogFormatError, match="does not match the log already in the project") \
            as err:
        step(run, other, x, [3, 4, 5])
    assert re.search(expect, str(err.value)), str(err.value)
    assert (shard_files(project_dir),
            open(os.path.join(project_dir, "manifest.json")).read()) == before


# =========================================================================== writer faults
def failing_after(n_ok: int, error: BaseException, calls=None):
    """A stand-in for logix.storage.writer.atomic_write: n_ok real writes, then `error`."""
    real = writer_module.write_shard
    calls = [] if calls is None else calls

    def write(path, *parts):
        calls.append(path)
        if len(calls) > n_ok:
            raise error
        return real(path, *parts)

    return write


def lost_rows(error: WriterError) -> int:
    match = re.search(r"(\d+) rows were not written", str(error))
    assert match, str(error)
    return int(match.group(1))


def test_disk_full_surfaces_at_next_end_and_keeps_written_shards(new_run, tmp_root,
                                                                  monkeypatch):
    """Shards of 2 rows, steps of 3: the disk fills up on the 4th shard (rows 6-7, queued by
    step 2, which leaves row 8 buffered). Step 3's end() raises, counting rows 6-8 as not
    written; the 3 shards written before stay listed and readable."""
    g = seeded(22)
    model = make_mlp(seed=22)
    full = OSError(errno.ENOSPC, "No space left on device")
    calls = []
    monkeypatch.setattr(writer_module, "write_shard", failing_after(3, full, calls))
    run = logging_run(new_run, "full", model, shard_rows=2)
    logged = []
    for i in range(3):
        ids = [f"r{i}-{k}" for k in range(3)]
        step(run, model, torch.randn(3, 6, generator=g), ids)
        logged += ids
    deadline = time.monotonic() + 30  # let the writer thread meet the full disk
    while run._session.writer._error is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(calls) == 4
    with pytest.raises(WriterError, match="No space left on device") as err:
        step(run, model, torch.randn(3, 6, generator=g), ["r3-0", "r3-1", "r3-2"])
    assert err.value.__cause__ is full
    project_dir = os.path.join(tmp_root, "full")
    on_disk, _ = LogReader(project_dir).read_all()
    assert on_disk == logged[:6]  # the three shards written before the disk filled up
    assert lost_rows(err.value) == len(logged) - len(on_disk)  # no row goes missing silently
    with pytest.raises(WriterError, match=f"{len(logged) - 6} rows were not written"):
        run.finalize()  # the second door reports it too
    assert Manifest.load(project_dir).rows == 6 and verify(project_dir) == 0
    # With space again, a new run logs the missing rows; the written ones are skipped.
    monkeypatch.undo()
    run = logging_run(new_run, "full", model, shard_rows=2)
    with pytest.warns(UserWarning, match="already logged"):
        step(run, model, torch.randn(3, 6, generator=g), logged[4:7])
    step(run, model, torch.randn(2, 6, generator=g), logged[7:9])
    run.finalize()
    assert LogReader(project_dir).read_all()[0] == logged and verify(project_dir) == 0


def test_permission_denied_surfaces_at_flush_and_finalize(new_run, tmp_root, monkeypatch):
    """Tests run as root, where chmod does not stop writes: the failure is simulated."""
    g = seeded(23)
    model = make_mlp(seed=23)
    denied = PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(writer_module, "write_shard", failing_after(0, denied))
    run = logging_run(new_run, "denied", model, shard_rows=100)
    for i in range(3):  # fewer rows than a shard: nothing is written until flush
        step(run, model, torch.randn(2, 6, generator=g), [f"{i}a", f"{i}b"])
    with pytest.raises(WriterError, match="Permission denied") as err:
        run.flush()
    assert lost_rows(err.value) == 6
    with pytest.raises(WriterError, match="6 rows were not written"):
        run.finalize()
    with pytest.raises(WriterError):
        step(run, model, torch.randn(2, 6, generator=g), ["later-a", "later-b"])
    project_dir = os.path.join(tmp_root, "denied")
    assert Manifest.load(project_dir).shards == [] and not shard_files(project_dir)
    assert verify(project_dir) == 0


def test_failed_manifest_update_counts_the_shard_as_not_written(new_run, tmp_root, monkeypatch):
    """The shard landed but its index line could not be written: its rows are reported lost,
    it stays unlisted (verify warns, exit 0), and a resumed run numbers its shards after it."""
    import logix.storage.session as session_module

    g = seeded(24)
    model = make_mlp(seed=24)
    real = session_module.append_rank_index
    calls = []

    def append(project_dir, entry):
        calls.append(entry.file)
        if len(calls) > 1:  # the first shard is listed, the second is not
            raise OSError(errno.ENOSPC, "No space left on device")
        real(project_dir, entry)

    monkeypatch.setattr(session_module, "append_rank_index", append)
    run = logging_run(new_run, "index", model, shard_rows=2)
    step(run, model, torch.randn(2, 6, generator=g), ["a", "b"])
    step(run, model, torch.randn(2, 6, generator=g), ["c", "d"])
    with pytest.raises(WriterError) as err:
        run.finalize()
    assert lost_rows(err.value) == 2
    project_dir = os.path.join(tmp_root, "index")
    assert LogReader(project_dir).read_all()[0] == ["a", "b"]
    assert shard_files(project_dir) == ["shard-r0-000000.safetensors",
                                        "shard-r0-000001.safetensors"]
    assert verify(project_dir) == 0
    monkeypatch.undo()
    run = logging_run(new_run, "index", model, shard_rows=2)
    step(run, model, torch.randn(2, 6, generator=g), ["c", "d"])
    run.finalize()
    assert [s.seq for s in Manifest.load(project_dir).shards] == [0, 2]
    assert LogReader(project_dir).read_all()[0] == ["a", "b", "c", "d"]


# =========================================================================== bad input
# Covered elsewhere (not repeated here):
#   end() without start(), nested start(), data_id count != batch size, duplicate ids in a
#   batch, non-str/int ids: tests/test_run_api.py::test_protocol_errors
#   mask of the wrong shape or type: tests/test_run_api.py::test_mask_shape_errors
#   unknown config keys, wrong types, bad literals: tests/test_run_api.py::
#   test_unknown_config_key_is_named, test_wrong_config_type_is_named,
#   test_bad_literal_is_named_with_allowed_values, test_yaml_config_errors_name_the_key
#   query ranks differ from the log: tests/test_influence.py::test_mismatched_query_is_refused
#   newer format version through the CLI: tests/test_cli.py::
#   test_newer_format_version_is_refused_with_a_clear_message
#   nonfinite="skip" keeps statistics: tests/test_statistics.py::
#   test_skipped_nonfinite_step_leaves_statistics_untouched
def test_nonfinite_gradients_are_refused_or_skipped_and_never_written(new_run, tmp_root):
    g = seeded(25)
    model = make_mlp(seed=25)
    good = torch.randn(3, 6, generator=g)
    bad = good.clone()
    bad[1, 0] = float("nan")
    for policy in ("error", "skip"):
        run = logging_run(new_run, policy, model, shard_rows=2, nonfinite=policy)
        step(run, model, good, ["g0", "g1", "g2"])
        if policy == "error":
            with pytest.raises(UsageError, match=r"NaN or inf gradients for data ids \['b1'\]; "
                                                 r"nothing of this step was logged.*nonfinite"):
                step(run, model, bad, ["b0", "b1", "b2"])
        else:
            with pytest.warns(UserWarning, match=r"Skipped a step with NaN or inf.*'b1'.*none of "
                                                   r"its 3 rows"):
                step(run, model, bad, ["b0", "b1", "b2"])
        assert run.get_log().data_ids == ["g0", "g1", "g2"]  # the bad step replaced nothing
        step(run, model, good * 2, ["h0", "h1", "h2"])
        run.finalize()
        ids, rows = LogReader(os.path.join(tmp_root, policy)).read_all()
        assert ids == ["g0", "g1", "g2", "h0", "h1", "h2"] and bool(torch.isfinite(rows).all())


@pytest.mark.parametrize("bad", ["nan input", "scale overflows float32"])
def test_nonfinite_rows_of_outer_products_are_refused(new_run, bad):
    """Rows made only of hot-path outer products are checked from their small factors instead
    of being read: a NaN factor, or products that overflow float32, are refused all the same."""
    torch.manual_seed(27)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    run = new_run()
    run.watch(model).add_lora(rank=3)
    run.setup({"grad": ["log"]})
    x, scale = torch.randn(4, 8), 1.0
    with run(data_id=[0, 1, 2, 3], scale=1e30):  # large, finite: kept
        model(x).pow(2).sum().backward()
    assert bool(torch.isfinite(run.get_log().grads).all())
    assert run._steps.current is None and len(run.layers.row_layout().runs) == 1
    if bad == "nan input":
        x[2, 0] = float("nan")
    else:
        scale = 1e38
    with pytest.raises(UsageError, match=r"NaN or inf gradients for data ids \[.*2"):
        with run(data_id=[0, 1, 2, 3], scale=scale):
            model(x).pow(2).sum().backward()


def test_newer_format_version_is_refused_by_reader_and_resume(new_run, tmp_root):
    g = seeded(26)
    model = make_mlp(seed=26)
    run = logging_run(new_run, "future", model, shard_rows=2)
    step(run, model, torch.randn(3, 6, generator=g), [0, 1, 2])
    run.finalize()
    project_dir = os.path.join(tmp_root, "future")
    path = os.path.join(project_dir, "manifest.json")
    manifest = json.load(open(path))
    manifest["format_version"] = 99
    json.dump(manifest, open(path, "w"))
    before = (shard_files(project_dir), open(path).read())
    message = r"format version 99; this LogIX reads versions up to 2\. Upgrade LogIX"
    with pytest.raises(LogFormatError, match=message):
        LogReader(project_dir)
    with pytest.raises(LogFormatError, match=message):
        new_run("future").watch(model).initialize_from_log()
    run = logging_run(new_run, "future", model, shard_rows=2)
    with pytest.raises(LogFormatError, match=message):
        step(run, model, torch.randn(3, 6, generator=g), [3, 4, 5])
    assert (shard_files(project_dir), open(path).read()) == before  # nothing overwritten


def test_empty_log_is_refused_by_queries(new_run, tmp_root):
    g = seeded(27)
    model = make_mlp(seed=27)
    run = logging_run(new_run, "empty", model)
    run.finalize()  # a log with a manifest and no rows
    run.eval()
    query = step(run, model, torch.randn(2, 6, generator=g), ["q0", "q1"])
    with pytest.raises((UsageError, LogFormatError), match="no (logged|saved) (rows|training)"):
        run.compute_influence_all(query, hessian="none")
    never = new_run("never").watch(model).add_lora(rank=2).eval()
    step(never, model, torch.randn(2, 6, generator=g), ["q0", "q1"])
    with pytest.raises(LogFormatError, match="no manifest.json"):
        never.compute_influence_all(hessian="none")


@pytest.mark.parametrize("hidden, name_filter, message", [
    (5, ["2"], r"tracked layers differ from the saved log's \(1 vs 2 layers\); the first that "
               r"differs: query '2' .*, saved log '0'"),
    # same layer names and ranks, another hidden width: the message says what differs
    (7, None, r"query '0' \(Linear 6 -> 7, rank 2 x 2\), saved log '0' \(Linear 6 -> 5, rank "
              r"2 x 2\)")])
def test_a_query_from_other_layers_is_refused_naming_the_difference(new_run, hidden, name_filter,
                                                                     message):
    g = seeded(28)
    model = make_mlp(seed=28)
    run = logging_run(new_run, "modules", model)
    step(run, model, torch.randn(3, 6, generator=g), [0, 1, 2])
    run.finalize()
    queried = make_mlp(hidden=hidden, seed=28)
    other = new_run("other").watch(queried, name_filter=name_filter).add_lora(rank=2).eval()
    query = step(other, queried, torch.randn(2, 6, generator=g), ["q0", "q1"])
    with pytest.raises(UsageError, match=message):
        run.compute_influence_all(query, hessian="none")


def test_query_with_other_projections_is_refused(new_run, tmp_root):
    g = seeded(29)
    model = make_mlp(seed=29)
    run = logging_run(new_run, "proj", model)
    step(run, model, torch.randn(3, 6, generator=g), [0, 1, 2])
    run.finalize()
    # A new process that forgot initialize_from_log() and projects with seed 1, not 0.
    query_run = new_run("proj", seed=1).watch(model).add_lora(rank=2).eval()
    query = step(query_run, model, torch.randn(2, 6, generator=g), ["q0", "q1"])
    with pytest.raises((UsageError, LogFormatError), match="projection"):
        query_run.compute_influence_all(query, hessian="none")


# =========================================================================== round trip
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.integers(1, 5), min_size=1, max_size=6),
       shard_rows=st.integers(1, 7), dtype=st.sampled_from(list(DTYPES)),
       num_workers=st.sampled_from([1, 2]), data=st.data())
def test_read_back_equals_logged(tmp_path_factory, batches, shard_rows, dtype, num_workers,
                                 data):
    """Whatever the batch sizes, shard size, dtype, writer threads and flush points, the log
    read back is what get_log() showed after each step, cast to the log dtype, in order; and
    after run.flush() a fresh reader sees every row logged so far."""
    flush_at = data.draw(st.sets(st.integers(0, len(batches) - 1)), label="flush_at")
    root = str(tmp_path_factory.mktemp("roundtrip"))
    model = make_mlp(seed=30)
    g = torch.Generator().manual_seed(len(batches) * 100 + shard_rows)
    run = logix.init("p", root_dir=root, rank=2, shard_rows=shard_rows, log_dtype=dtype,
                     num_workers=num_workers)
    run.watch(model).add_lora().setup({"grad": ["log"]}).save(True)
    ids, rows = [], []
    for i, b in enumerate(batches):
        step_ids = [f"s{i}-{k}" for k in range(b)]
        log = step(run, model, torch.randn(b, 6, generator=g), step_ids)
        assert log.data_ids == step_ids and log.grads.shape[0] == b
        ids += step_ids
        rows.append(log.grads.to(DTYPES[dtype]))
        if i in flush_at:
            run.flush()
            got_ids, got = LogReader(os.path.join(root, "p")).read_all()
            assert got_ids == ids and torch.equal(got, torch.cat(rows))
    run.finalize()
    got_ids, got = LogReader(os.path.join(root, "p")).read_all()
    assert got_ids == ids
    assert got.dtype == DTYPES[dtype] and torch.equal(got, torch.cat(rows))
    seqs = [s.seq for s in Manifest.load(os.path.join(root, "p")).shards]
    assert seqs == list(range(len(seqs)))
    assert all(s.rows <= shard_rows for s in Manifest.load(os.path.join(root, "p")).shards)


# =========================================================================== threads
def slow_writes(monkeypatch, seconds: float) -> None:
    real = writer_module.write_shard

    def write(path, *parts):
        time.sleep(seconds)
        return real(path, *parts)

    monkeypatch.setattr(writer_module, "write_shard", write)


def test_get_log_and_flush_while_the_writer_is_busy(new_run, tmp_root, monkeypatch):
    """A slow disk keeps the writer thread busy; meanwhile the main thread logs, reads and even
    scribbles on get_log(), and another thread flushes now and then. The log on disk holds
    exactly the rows a run without a writer computes."""
    g = seeded(31)
    model = make_mlp(seed=31)
    xs = [torch.randn(3, 6, generator=g) for _ in range(12)]
    reference = logix.init("ref", root_dir=tmp_root, rank=2)
    reference.watch(model).add_lora()
    expected = [step(reference, model, x, [f"{i}-{k}" for k in range(3)]).grads.clone()
                for i, x in enumerate(xs)]

    slow_writes(monkeypatch, 0.01)
    run = logging_run(new_run, "busy", model, shard_rows=2, queue_size=1)
    stop, errors = threading.Event(), []

    def flusher():
        while not stop.is_set():
            try:
                run.flush()
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)
                return
            time.sleep(0.003)

    thread = threading.Thread(target=flusher)
    thread.start()
    try:
        for i, x in enumerate(xs):
            log = step(run, model, x, [f"{i}-{k}" for k in range(3)])
            assert torch.equal(run.get_log().grads, expected[i])
            assert torch.equal(run.get_log(copy=True).grads, expected[i])
            log.grads.mul_(-7.0)  # the writer owns its copy: this must not reach the disk
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    run.finalize()
    ids, rows = LogReader(os.path.join(tmp_root, "busy")).read_all()
    assert ids == [f"{i}-{k}" for i in range(12) for k in range(3)]
    assert torch.equal(rows, torch.cat(expected))


def test_two_runs_in_one_process_interleaved(new_run, tmp_root, monkeypatch):
    g = seeded(32)
    models = {"one": make_mlp(seed=32), "two": make_mlp(in_dim=4, hidden=3, seed=33)}
    slow_writes(monkeypatch, 0.002)
    runs = {"one": logging_run(new_run, "one", models["one"], shard_rows=2),
            "two": logging_run(new_run, "two", models["two"], rank=3, shard_rows=3,
                               log_dtype="bfloat16", num_workers=2)}
    logged = {name: ([], []) for name in runs}
    for i in range(8):
        for name in (("one", "two") if i % 2 else ("two", "one")):
            model, b = models[name], 1 + (i % 3)
            ids = [f"{name}{i}-{k}" for k in range(b)]
            log = step(runs[name], model, torch.randn(b, model[0].in_features, generator=g), ids)
            logged[name][0].extend(ids)
            logged[name][1].append(log.grads.to(DTYPES[runs[name].config.logging.log_dtype]))
    for run in runs.values():
        run.finalize()
    for name in runs:
        ids, rows = LogReader(os.path.join(tmp_root, name)).read_all()
        assert ids == logged[name][0]
        assert torch.equal(rows, torch.cat(logged[name][1]))
        assert verify(os.path.join(tmp_root, name)) == 0


def test_float16_overflow_is_refused_not_stored_as_inf(new_run, tmp_root):
    seeded(31)
    model = torch.nn.Linear(6, 3)
    run = logging_run(new_run, "fp16", model, log_dtype="float16")
    x = torch.full((2, 6), 1e3)  # gradients of (Wx)^2 ~ 1e6: far beyond float16's range
    with pytest.raises(UsageError, match="float16's range"):
        step(run, model, x, [0, 1])
    run.finalize()
    assert run.reader().rows == 0
