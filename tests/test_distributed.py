"""Two torchrun processes (gloo, CPU) log and query like one process."""

import os
import subprocess
import sys

import pytest
import torch

from logix.storage.manifest import Manifest
from logix.storage.reader import LogReader

WORKER = os.path.join(os.path.dirname(__file__), "workers", "ddp_logging.py")


def launch(root, mode, processes):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if processes == 1:
        command = [sys.executable, WORKER, str(root), mode]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={processes}", WORKER, str(root), mode]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    for processes in (1, 2):
        done = launch(root, "log", processes)
        assert done.returncode == 0, done.stderr[-3000:]
    return root


def rows_by_id(project_dir):
    ids, rows = LogReader(project_dir).read_all()
    assert len(ids) == 40 and len(set(ids)) == 40
    return dict(zip(ids, rows))


@pytest.mark.slow  # torchrun
def test_two_processes_log_the_same_rows_and_statistics(logs):
    one, two = rows_by_id(logs / "ddp-log-1"), rows_by_id(logs / "ddp-log-2")
    assert one.keys() == two.keys()
    for i in one:
        torch.testing.assert_close(two[i], one[i], rtol=1e-5, atol=1e-6)
    manifest = Manifest.load(str(logs / "ddp-log-2"))
    assert {s.rank for s in manifest.shards} == {0, 1}
    assert len({s.file for s in manifest.shards}) == len(manifest.shards)
    r1, r2 = (torch.load(logs / f"result-log-{w}.pt") for w in (1, 2))
    for key, value in r1["stats"].items():
        assert value is not None, key
        torch.testing.assert_close(r2["stats"][key], value, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # torchrun
def test_two_processes_score_like_one(logs):
    r1, r2 = (torch.load(logs / f"result-log-{w}.pt") for w in (1, 2))
    order = [r2["full"]["tgt_ids"].index(i) for i in r1["full"]["tgt_ids"]]
    torch.testing.assert_close(r2["full"]["influence"][:, order], r1["full"]["influence"],
                               rtol=1e-4, atol=1e-5)
    full = r2["full"]["influence"]
    values = full.sort(1, descending=True).values
    torch.testing.assert_close(r2["top"]["top_scores"], values[:, :4])
    torch.testing.assert_close(r2["top"]["bottom_scores"], values[:, -4:].flip(1))
    assert r2["rank0"]["influence"].shape == (3, 40)
    for kind in ("hessian-full", "hessian-lissa"):  # fitted from the rows each rank reads
        order = [r2[kind]["tgt_ids"].index(i) for i in r1[kind]["tgt_ids"]]
        torch.testing.assert_close(r2[kind]["influence"][:, order], r1[kind]["influence"],
                                   rtol=1e-4, atol=1e-5)
        assert r2[kind]["meta"]["damping"] == pytest.approx(r1[kind]["meta"]["damping"])


@pytest.mark.slow  # torchrun
def test_fsdp2_fully_shard_logs_and_scores_like_one_process(logs):
    """FSDP2 on CPU (gloo): `fully_shard` on each Linear and the root. The hooks see the
    unsharded weights' inputs and output gradients, so rows, statistics and scores equal one
    process without FSDP."""
    done = launch(logs, "fsdp", 2)
    assert done.returncode == 0, done.stderr[-3000:]
    one, fsdp = rows_by_id(logs / "ddp-log-1"), rows_by_id(logs / "ddp-fsdp-2")
    assert one.keys() == fsdp.keys()
    for i in one:
        torch.testing.assert_close(fsdp[i], one[i], rtol=1e-5, atol=1e-6)
    r1, r2 = (torch.load(logs / name) for name in ("result-log-1.pt", "result-fsdp-2.pt"))
    for key, value in r1["stats"].items():
        torch.testing.assert_close(r2["stats"][key], value, rtol=1e-4, atol=1e-6)
    order = [r2["full"]["tgt_ids"].index(i) for i in r1["full"]["tgt_ids"]]
    torch.testing.assert_close(r2["full"]["influence"][:, order], r1["full"]["influence"],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # torchrun
def test_a_crashed_rank_leaves_the_other_shards_readable(tmp_path):
    done = launch(tmp_path, "crash", 2)
    assert done.returncode != 0
    project = tmp_path / "ddp-crash-2"
    manifest = Manifest.load(str(project))
    by_rank = {r: [s for s in manifest.shards if s.rank == r] for r in (0, 1)}
    assert sum(s.rows for s in by_rank[1]) == 16  # four steps of four, all flushed
    ids, rows = LogReader(str(project)).read_all()
    assert len(ids) == sum(s.rows for s in manifest.shards) and torch.isfinite(rows).all()
    assert not list((project / "logs").glob("*.tmp"))


@pytest.mark.slow  # torchrun
def test_verify_accepts_a_distributed_log(logs, capsys):
    from logix.cli import main

    assert main(["verify", str(logs / "ddp-log-2")]) == 0
    out = capsys.readouterr().out
    assert "0 errors, 0 warnings" in out


@pytest.mark.slow  # torchrun
def test_a_log_reopened_with_initialize_from_log_counts_saved_statistics_once(logs):
    """Two processes each load the saved statistics, log more rows and all-reduce at finalize:
    the earlier session's statistics must count once, not once per process."""
    done = launch(logs, "resume", 2)
    assert done.returncode == 0, done.stderr[-3000:]
    one, resumed = rows_by_id(logs / "ddp-log-1"), rows_by_id(logs / "ddp-resume-2")
    assert one.keys() == resumed.keys()
    r1, r2 = (torch.load(logs / name) for name in ("result-log-1.pt", "result-resume-2.pt"))
    for key, value in r1["stats"].items():
        torch.testing.assert_close(r2["stats"][key], value, rtol=1e-4, atol=1e-6)


def test_ids_logged_by_more_than_one_rank_are_warned_of(tmp_path, monkeypatch):
    """on_duplicate sees a rank's own ids only: finalize gathers every rank's and names those
    logged twice (what a DistributedSampler's padding does)."""
    import warnings

    from logix import distributed
    from logix.config import LoggingConfig
    from logix.storage.session import LogSession

    shares = [{None: {0, 1, 2}}, {None: {2, 3}, "c0": {9}}, {"c0": {9, 8}}]
    monkeypatch.setattr(distributed, "all_gather_objects", lambda mine: shares)
    session = LogSession(str(tmp_path), LoggingConfig())
    with pytest.warns(UserWarning) as caught:
        session.warn_of_ids_on_several_ranks()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert messages[0].startswith("1 data ids were logged by more than one rank (e.g. ['2'])")
    assert "rank in checkpoint 'c0' (e.g. ['9'])" in messages[1]
    shares = [{None: {0, 1}}, {None: {2, 3}}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        session.warn_of_ids_on_several_ranks()
