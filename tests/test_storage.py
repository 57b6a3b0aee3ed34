"""The on-disk format (DESIGN.md section 5): shards, manifest, state files, dtypes, appending,
reopening in a new process, and the writer's error reporting."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import zlib

import xxhash

import pytest
import torch
from torch import nn
from safetensors import safe_open
from safetensors.torch import load_file

import logix
from conftest import make_mlp, seeded
from logix.errors import LogFormatError, UsageError, WriterError
from logix.storage.format import DTYPES, parse_shard_name
from logix.storage.manifest import Manifest
from logix.storage.reader import LogReader

ALL = {"grad": ["log", "covariance"], "forward": ["covariance"], "backward": ["covariance"]}
BATCH_SIZES = (2, 3, 4)


def log_project(new_run, project, model_seed=0, batch_sizes=BATCH_SIZES, rank=3, first_id=0,
                setup=ALL, **overrides):
    """Log a few steps of make_mlp; returns the run, the ids and the float32 rows it logged."""
    model = make_mlp(seed=model_seed)
    g = seeded(100 + first_id)
    run = new_run(project, **overrides)
    run.watch(model)
    if rank is not None:
        run.add_lora(rank=rank)
    run.setup(setup).save(True)
    ids, rows = [], []
    for step, b in enumerate(batch_sizes):
        step_ids = [f"ex{first_id + len(ids) + i}" for i in range(b)]
        x = torch.randn(b, 6, generator=g)
        with run(data_id=step_ids):
            model(x).pow(2).sum().backward()
        ids += step_ids
        rows.append(run.get_log().grads.clone())
    run.finalize()
    return run, ids, torch.cat(rows)


def shard_files(project_dir):
    logs = os.path.join(project_dir, "logs")
    return sorted(f for f in os.listdir(logs) if parse_shard_name(f))


def all_files(project_dir):
    return [os.path.join(d, f) for d, _, files in os.walk(project_dir) for f in files]


# --------------------------------------------------------------------------- new process
REOPEN_SCRIPT = r"""
import sys, torch, logix
sys.path.insert(0, sys.argv[3])
from conftest import make_mlp
from logix.storage.reader import LogReader

root, out = sys.argv[1], sys.argv[2]
ids, rows = LogReader(root + "/reopen").read_all()
run = logix.init("reopen", root_dir=root)
run.watch(make_mlp(seed=0)).initialize_from_log()
saved = {"rows": rows.clone()}
for name, p in run.projections.items():
    saved[name + "/p_in"], saved[name + "/p_out"] = p.p_in, p.p_out
for (name, kind) in run.statistics.sums:
    saved[name + "/" + kind] = run.statistics.get(name, kind)
loaded = sorted("/".join(k) for k in run.statistics.sums)
torch.save({"ids": ids, "tensors": saved, "loaded": loaded, "init": run.projection_meta}, out)
"""


def test_log_reopened_in_a_new_process(new_run, tmp_root, tmp_path):
    run, ids, rows = log_project(new_run, "reopen", shard_rows=2)
    out = tmp_path / "reopened.pt"
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", REOPEN_SCRIPT, tmp_root, str(out), tests_dir],
                   check=True, timeout=120)
    got = torch.load(out)
    assert len(ids) == 9 and got["ids"] == ids
    assert torch.equal(got["tensors"]["rows"], rows)
    assert got["init"] == run.projection_meta and got["init"]["init"] == "random"
    assert run.projections["2"].p_out is None  # 3 outputs at rank 3: the identity
    for name, p in run.projections.items():
        for side in ("p_in", "p_out"):
            mine, theirs = getattr(p, side), got["tensors"][f"{name}/{side}"]
            assert (mine is None and theirs is None) or torch.equal(theirs, mine), (name, side)
    kinds = sorted("/".join(key) for key in run.statistics.sums)
    assert {f"{n}/{k}" for n in ("0", "2") for k in ("forward", "backward", "grad")} <= set(kinds)
    assert got["loaded"] == kinds
    for key in kinds:
        name, kind = key.split("/")
        assert torch.equal(got["tensors"][key], run.statistics.get(name, kind)), key


def test_initialize_from_log_restores_state_in_process(new_run):
    run, ids, rows = log_project(new_run, "again")
    fresh = new_run("again").watch(make_mlp(seed=0)).initialize_from_log()
    assert fresh.layout() == run.layout()
    for name in run.projections:
        assert torch.equal(fresh.projections[name].p_in, run.projections[name].p_in)
    for key, total in run.statistics.sums.items():
        assert torch.equal(fresh.statistics.sums[key], total)
        assert fresh.statistics.counts[key] == run.statistics.counts[key]


def test_initialize_from_log_checks_the_watched_layers(new_run):
    log_project(new_run, "mismatch")
    with pytest.raises(UsageError, match="differ"):
        new_run("mismatch").watch(make_mlp(seed=0), name_filter=["0"]).initialize_from_log()
    with pytest.raises(UsageError, match="differ"):
        new_run("mismatch").watch(make_mlp(hidden=4, seed=0)).initialize_from_log()
    with pytest.raises(LogFormatError, match="manifest"):
        new_run("nothing-here").watch(make_mlp(seed=0)).initialize_from_log()


# --------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_log_dtype_roundtrip(new_run, tmp_root, dtype):
    run, ids, rows = log_project(new_run, dtype, log_dtype=dtype, shard_rows=4)
    assert rows.dtype == torch.float32  # the in-memory log stays float32
    read_ids, read = LogReader(os.path.join(tmp_root, dtype)).read_all()
    assert read_ids == ids
    assert read.dtype == DTYPES[dtype]
    assert torch.equal(read, rows.to(DTYPES[dtype]))
    if dtype != "float32":
        assert not torch.equal(read.float(), rows)  # the cast did happen
    assert Manifest.load(os.path.join(tmp_root, dtype)).dtype == dtype


# --------------------------------------------------------------------------- shards
@pytest.mark.parametrize("num_workers", [1, 3])
def test_shard_boundaries_do_not_matter(new_run, tmp_root, num_workers):
    results = {}
    for shard_rows in (1, 3, 1000):
        project = f"rows{shard_rows}"
        _, ids, rows = log_project(new_run, project, shard_rows=shard_rows,
                                   num_workers=num_workers)
        files = shard_files(os.path.join(tmp_root, project))
        assert len(files) == -(-9 // shard_rows)
        results[shard_rows] = LogReader(os.path.join(tmp_root, project)).read_all()
        assert results[shard_rows][0] == ids and torch.equal(results[shard_rows][1], rows)
    for shard_rows in (3, 1000):
        assert results[shard_rows][0] == results[1][0]
        assert torch.equal(results[shard_rows][1], results[1][1])


def test_shards_are_plain_safetensors_and_manifest_is_exact(new_run, tmp_root):
    run, ids, rows = log_project(new_run, "plain", shard_rows=4)
    project_dir = os.path.join(tmp_root, "plain")
    manifest = Manifest.load(project_dir)
    on_disk = shard_files(project_dir)
    assert [os.path.basename(s.file) for s in manifest.shards] == on_disk
    assert len(on_disk) == 3
    seen_ids, seen_rows = [], []
    for shard in manifest.shards:
        path = os.path.join(project_dir, shard.file)
        tensors = load_file(path)
        assert set(tensors) == {"grad"}
        grad = tensors["grad"]
        assert grad.dtype == torch.float32 and grad.shape == (shard.rows, manifest.dim)
        with safe_open(path, framework="pt") as f:
            shard_ids = json.loads(f.metadata()["data_ids"])
        assert len(shard_ids) == shard.rows
        data = open(path, "rb").read()
        assert shard.bytes == len(data) == os.path.getsize(path)
        assert shard.checksum == f"xxh3:{xxhash.xxh3_64(data).hexdigest()}"
        assert parse_shard_name(os.path.basename(shard.file)) == (shard.rank, shard.seq)
        seen_ids += shard_ids
        seen_rows.append(grad)
    assert seen_ids == ids and torch.equal(torch.cat(seen_rows), rows)
    assert manifest.rows == 9 and manifest.dim == rows.shape[1]
    assert [(m.name, m.offset, m.dim) for m in manifest.modules] == \
        [(e.name, e.offset, e.dim) for e in run.layout()]
    raw = json.load(open(os.path.join(project_dir, "manifest.json")))
    assert raw["format"] == "logix" and raw["rows"] == 9 and raw["dtype"] == "float32"
    assert not [f for f in all_files(project_dir) if f.endswith(".tmp")]
    for name in ("statistics.safetensors", "projections.safetensors"):
        assert os.path.isfile(os.path.join(project_dir, "state", name))


def test_finalize_stops_writer_threads(new_run):
    before = {t for t in threading.enumerate() if t.name == "logix-writer"}
    log_project(new_run, "threads", shard_rows=2)
    after = {t for t in threading.enumerate() if t.name == "logix-writer"}
    assert after <= before


# --------------------------------------------------------------------------- appending
def test_second_run_appends_shards(new_run, tmp_root):
    _, ids1, rows1 = log_project(new_run, "append", shard_rows=4)
    project_dir = os.path.join(tmp_root, "append")
    first = Manifest.load(project_dir).shards
    _, ids2, rows2 = log_project(new_run, "append", shard_rows=4, first_id=9)
    manifest = Manifest.load(project_dir)
    seqs = [s.seq for s in manifest.shards]
    assert manifest.shards[:len(first)] == first
    assert seqs == sorted(set(seqs)) and len(seqs) == 2 * len(first)
    assert [os.path.basename(s.file) for s in manifest.shards] == shard_files(project_dir)
    ids, rows = LogReader(project_dir).read_all()
    assert ids == ids1 + ids2 and not set(ids1) & set(ids2)
    assert torch.equal(rows, torch.cat([rows1, rows2]))
    # Both runs' statistics are kept (merged; tests/test_statistics.py checks the values).
    fresh = new_run("append").watch(make_mlp(seed=0)).initialize_from_log()
    assert fresh.statistics.counts[("0", "grad")] == len(ids1) + len(ids2)


def rewrite_shard_entries(project_dir, change, **manifest_keys):
    """Rewrite every shard entry of a log's manifest and rank indexes with `change(entry)`
    (a dict -> dict), as an earlier release would have written them."""
    path = os.path.join(project_dir, "manifest.json")
    raw = json.load(open(path))
    raw.update(manifest_keys, shards=[change(s) for s in raw["shards"]])
    json.dump(raw, open(path, "w"))
    logs = os.path.join(project_dir, "logs")
    for name in (n for n in os.listdir(logs) if n.endswith(".jsonl")):
        lines = [json.dumps(change(json.loads(line))) for line in open(os.path.join(logs, name))]
        open(os.path.join(logs, name), "w").write("\n".join(lines) + "\n")


def as_format_1(project_dir):
    """Rewrite a log's manifest and rank indexes as format version 1 recorded shards: a sha256
    under "sha256" (no "checksum")."""
    def old(entry):
        with open(os.path.join(project_dir, entry.pop("checksum") and entry["file"]), "rb") as f:
            return dict(entry, sha256=hashlib.sha256(f.read()).hexdigest())

    rewrite_shard_entries(project_dir, old, format_version=1)


def damage(path):
    """Flip a byte inside a shard's rows (the header still parses) and move its mtime, so a
    process that verified it before checks it again."""
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0xFF
    open(path, "wb").write(bytes(data))
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def append_and_damage_the_old(new_run, project, project_dir, ids1, rows1, algorithm):
    """A log whose shards record `algorithm` reads and verifies; a run appending to it records
    xxh3 for its own shards (the manifest, version 2, names each shard's algorithm); damage to
    an old shard is caught with its own algorithm."""
    from logix.storage.verify import verify

    old = Manifest.load(project_dir).shards
    assert old and all(s.checksum.startswith(f"{algorithm}:") for s in old)
    ids, rows = LogReader(project_dir).read_all()
    assert ids == ids1 and torch.equal(rows, rows1) and verify(project_dir).ok
    _, ids2, rows2 = log_project(new_run, project, shard_rows=4, first_id=9)
    manifest = Manifest.load(project_dir)
    assert manifest.shards[:len(old)] == old
    assert all(s.checksum.startswith("xxh3:") for s in manifest.shards[len(old):])
    assert json.load(open(os.path.join(project_dir, "manifest.json")))["format_version"] == 2
    ids, rows = LogReader(project_dir).read_all()
    assert ids == ids1 + ids2 and torch.equal(rows, torch.cat([rows1, rows2]))
    assert verify(project_dir).ok
    damage(os.path.join(project_dir, old[0].file))
    with pytest.raises(LogFormatError, match=f"{algorithm} .* does not match"):
        LogReader(project_dir).read_all()
    assert any(algorithm in e for e in verify(project_dir).errors)


def test_new_shards_record_an_xxh3_and_corruption_is_caught(new_run, tmp_root):
    from logix.storage.verify import verify

    _, ids, rows = log_project(new_run, "xxh", shard_rows=4)
    project_dir = os.path.join(tmp_root, "xxh")
    raw = json.load(open(os.path.join(project_dir, "manifest.json")))
    assert raw["format_version"] == 2 and all(
        s["checksum"].startswith("xxh3:") and "sha256" not in s for s in raw["shards"])
    assert verify(project_dir).ok
    damage(os.path.join(project_dir, raw["shards"][1]["file"]))
    with pytest.raises(LogFormatError, match="xxh3 .* does not match"):
        LogReader(project_dir).read_all()
    report = verify(project_dir)
    assert [raw["shards"][1]["file"] in e and "xxh3" in e for e in report.errors] == [True]


def test_shards_of_an_earlier_release_with_crc32_are_verified_and_appended(new_run, tmp_root):
    _, ids1, rows1 = log_project(new_run, "crc", shard_rows=4)
    project_dir = os.path.join(tmp_root, "crc")

    def crc32(entry):
        with open(os.path.join(project_dir, entry["file"]), "rb") as f:
            return dict(entry, checksum=f"crc32:{zlib.crc32(f.read()):08x}")

    rewrite_shard_entries(project_dir, crc32)
    append_and_damage_the_old(new_run, "crc", project_dir, ids1, rows1, "crc32")


def test_format_1_log_with_sha256_is_read_verified_and_appended(new_run, tmp_root):
    _, ids1, rows1 = log_project(new_run, "v1", shard_rows=4)
    project_dir = os.path.join(tmp_root, "v1")
    as_format_1(project_dir)
    append_and_damage_the_old(new_run, "v1", project_dir, ids1, rows1, "sha256")


def test_index_built_from_a_format_1_log_stays_fresh_and_verifies(new_run, tmp_root):
    """(Indexes written before format 2 have an older index format and are rebuilt:
    tests/test_index.py::test_an_index_written_by_an_older_format_is_rebuilt.)"""
    from logix.index.rows import RowStore
    from logix.index.store import FRESH, IndexManifest, layout_of, shard_entries, state

    _, ids, rows = log_project(new_run, "v1index", shard_rows=4)
    project_dir = os.path.join(tmp_root, "v1index")
    as_format_1(project_dir)
    manifest = Manifest.load(project_dir)
    held = shard_entries(manifest.shards)  # what an index built from this log records
    assert all(entry["checksum"].startswith("sha256:") for entry in held)
    layout = layout_of(manifest)
    index = IndexManifest(name="i", kind="flat", mode="dot", faiss={}, layout=layout,
                          shards=held)
    assert state(index, manifest.shards, layout)[0] == FRESH
    store = RowStore(project_dir, held, manifest.dim)
    assert torch.equal(store.read(torch.arange(len(ids))), rows)
    damage(os.path.join(project_dir, held[0]["file"]))
    with pytest.raises(LogFormatError, match="sha256 .* does not match"):
        store.read(torch.arange(2))


@pytest.mark.parametrize("change", [dict(rank=4), dict(log_dtype="bfloat16"), dict(seed=1)],
                         ids=["rank", "dtype", "seed"])
def test_incompatible_run_refuses_to_append(new_run, tmp_root, change):
    log_project(new_run, "strict", shard_rows=4)
    project_dir = os.path.join(tmp_root, "strict")
    before = shard_files(project_dir)
    rank = change.pop("rank", 3)
    with pytest.raises(LogFormatError, match="does not match"):
        log_project(new_run, "strict", rank=rank, first_id=9, **change)
    assert shard_files(project_dir) == before
    assert LogReader(project_dir).rows == 9


@pytest.mark.parametrize("change", [dict(rank=4), dict(log_dtype="bfloat16")],
                         ids=["rank", "dtype"])
def test_finalize_after_a_refused_append_leaves_the_log_as_it_was(new_run, tmp_root, change):
    """A script that finalizes in a `finally` after its first step was refused must not write
    its own projections, statistics or config over the log it did not match."""
    from logix.storage.verify import verify

    log_project(new_run, "kept", shard_rows=4)
    project_dir = os.path.join(tmp_root, "kept")
    state_files = [os.path.join(project_dir, "manifest.json")] + [
        os.path.join(project_dir, "state", n) for n in os.listdir(os.path.join(project_dir,
                                                                               "state"))]
    before = {path: open(path, "rb").read() for path in state_files}
    model = make_mlp(seed=0)
    run = new_run("kept", **{k: v for k, v in change.items() if k != "rank"})
    run.watch(model).add_lora(rank=change.get("rank", 3))
    run.setup(ALL).save(True)
    with pytest.raises(LogFormatError, match="does not match"):
        with run(data_id=["new"]):
            model(torch.randn(1, 6)).pow(2).sum().backward()
    with pytest.raises(LogFormatError, match="does not match"):
        run.finalize()
    assert {path: open(path, "rb").read() for path in state_files} == before
    assert verify(project_dir).ok


# --------------------------------------------------------------------------- failures
def test_writer_failure_is_reported(new_run, tmp_root, monkeypatch):
    import logix.storage.writer as writer

    def broken(path, *parts):
        raise OSError("disk full")

    monkeypatch.setattr(writer, "write_shard", broken)
    with pytest.raises(WriterError, match="disk full|rows were not written"):
        log_project(new_run, "broken", shard_rows=1)
    assert not os.path.isdir(os.path.join(tmp_root, "broken", "logs")) or \
        not shard_files(os.path.join(tmp_root, "broken"))


def test_reader_rejects_a_folder_without_manifest(tmp_path):
    with pytest.raises(LogFormatError, match="manifest"):
        LogReader(str(tmp_path))


def test_resumed_run_skips_or_refuses_ids_already_logged(tmp_path):
    import warnings

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x = torch.randn(8, 4)

    def log(ids, **overrides):
        run = logix.init("resume", root_dir=str(tmp_path), shard_rows=2, **overrides)
        run.watch(model)
        run.setup({"grad": ["log"]})
        run.save(True)
        with run(data_id=ids):
            model(x[: len(ids)]).sum().backward()
        run.finalize()
        return run

    log([0, 1, 2, 3])
    with pytest.warns(UserWarning, match="already logged"):
        run = log([2, 3, 4, 5])  # default on_duplicate: skip
    ids, _ = run.reader().read_all()
    assert sorted(ids) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(logix.UsageError, match="already in this log"):
        log([5, 6], on_duplicate="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = log([0, 7], on_duplicate="allow")
    ids, _ = run.reader().read_all()
    assert sorted(ids) == [0, 0, 1, 2, 3, 4, 5, 7]


def test_a_damaged_header_entry_is_named_as_such(new_run, tmp_root):
    from logix.storage.format import read_header

    log_project(new_run, "header", shard_rows=4)
    path = os.path.join(tmp_root, "header", "logs", shard_files(os.path.join(tmp_root,
                                                                            "header"))[0])
    data = open(path, "rb").read()
    open(path, "wb").write(data.replace(b'"data_offsets"', b'"data_offsetz"', 1))
    with pytest.raises(LogFormatError, match="no valid data_offsets .* header is damaged"):
        read_header(path)


def test_two_writers_of_one_file_do_not_clobber_each_other(tmp_path):
    """Every rank of a job may cache the same file: a write that finishes while another is half
    done leaves both intact (they shared one temporary name: the second rename failed)."""
    from logix.storage.format import atomic_file, atomic_write

    path = str(tmp_path / "norms.pt")
    first = atomic_file(path)
    first.__enter__().write(b"first")
    atomic_write(path, b"second")
    assert open(path, "rb").read() == b"second"
    first.__exit__(None, None, None)
    assert open(path, "rb").read() == b"first" and os.listdir(tmp_path) == ["norms.pt"]
