"""Queries never score a damaged log or return NaN/inf silently, and refuse bad arguments:
shard verification, argument checks, singular curvature, top-k, the train-norm cache key,
score-file handles and `logix top --query ID`."""

import dataclasses
import json
import os
import tempfile

import pytest
import torch
from torch import nn
from test_influence import brute_force, log_run, mlp_data, query_log

import logix
from logix.cli import main
from logix.errors import LogFormatError, UsageError
from logix.statistics.eigen import EKFAC
from logix.storage import reader as reader_module
from logix.storage.manifest import Manifest
from logix.storage.reader import LogReader
from logix.storage.scores import open_scores, save_scores


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4))


def logged(tmp_path, n=24, shard_rows=8, **kw):
    model = make_mlp()
    x, y = mlp_data(max(n, 3))
    run = log_run(tmp_path, model, x[:n], y[:n], shard_rows=shard_rows, **kw)
    return run, query_log(run, model, x, y)


def flip_bytes(path, value=0xFF, count=8):
    """Overwrite `count` bytes near the end of the file (row data) and move its mtime on."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size - 4 * count)
        f.write(bytes([value]) * count)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


# --------------------------------------------------------------------------- shard verification
def test_corrupted_shard_is_refused_naming_it(tmp_path):
    run, test = logged(tmp_path)
    clean = run.compute_influence_all(test, hessian="none")["influence"]
    shard = run.reader().shards[1]
    flip_bytes(os.path.join(run.project_dir, shard.file), value=0x7F)
    with pytest.raises(LogFormatError, match=shard.file.split("/")[-1]) as info:
        run.compute_influence_all(test, hessian="none")
    assert "xxh3" in str(info.value) and "verify=False" in str(info.value)
    unchecked = run.compute_influence_all(test, hessian="none",
                                          loader=LogReader(run.project_dir, verify=False))
    changed = (unchecked["influence"] != clean).any(0)
    assert changed.any() and not changed[:8].any()  # only rows of shard 1 differ


def test_truncated_shard_is_refused(tmp_path):
    run, test = logged(tmp_path)
    shard = run.reader().shards[0]
    path = os.path.join(run.project_dir, shard.file)
    with open(path, "r+b") as f:
        f.truncate(shard.bytes - 4)
    with pytest.raises(LogFormatError, match="bytes but the manifest recorded"):
        run.compute_influence_all(test, hessian="none")


def test_a_shard_wider_than_the_manifest_is_refused(tmp_path):
    """A shard rewritten with wider rows (and a manifest entry that matches its bytes, as a tool
    writing shards directly might leave) is refused, not read as shifted rows."""
    from logix.storage.format import (DATA_IDS_KEY, GRAD_KEY, atomic_write, safetensors_header,
                                      tensor_bytes)
    from logix.storage.reader import map_shard

    run, test = logged(tmp_path)
    manifest = Manifest.load(run.project_dir)
    shard = manifest.shards[0]
    path = os.path.join(run.project_dir, shard.file)
    ids, rows = map_shard(path, manifest.dim)
    wider = torch.cat([rows, torch.zeros(rows.shape[0], 2, dtype=rows.dtype)], dim=1)
    header = safetensors_header({GRAD_KEY: (wider.dtype, list(wider.shape))},
                                {DATA_IDS_KEY: json.dumps(ids)})
    checksum = atomic_write(path, header, tensor_bytes(wider))
    manifest.shards[0] = dataclasses.replace(shard, checksum=checksum,
                                             bytes=os.path.getsize(path))
    manifest.save(run.project_dir)
    with pytest.raises(LogFormatError, match="wide"):
        logix.Attributor(run.project_dir).compute_influence_all(test, hessian="none",
                                                                 progress=False)


def test_verification_runs_once_per_shard_and_process(tmp_path, monkeypatch):
    run, test = logged(tmp_path, setup=())  # no EK-FAC fit: finalize reads no shard
    hashed = []
    real = reader_module.file_checksum
    monkeypatch.setattr(reader_module, "file_checksum",
                        lambda path, algorithm: hashed.append(path) or real(path, algorithm))
    first = run.compute_influence_all(test, hessian="none", mode="cosine")["influence"]
    assert len(hashed) == len(run.reader().shards) == 3
    again = run.compute_influence_all(test, hessian="none", mode="cosine")["influence"]
    assert len(hashed) == 3 and torch.equal(first, again)


def test_config_verify_false_reads_unchecked(tmp_path):
    run, test = logged(tmp_path, verify=False)
    assert run.config.influence.verify is False and run.reader().verify is False
    flip_bytes(os.path.join(run.project_dir, run.reader().shards[0].file), value=0x3F)
    assert run.compute_influence_all(test, hessian="none")["influence"].isfinite().all()


def test_nan_rows_read_unchecked_raise_naming_the_module(tmp_path):
    run, test = logged(tmp_path, verify=False)
    flip_bytes(os.path.join(run.project_dir, run.reader().shards[2].file))  # 0xFF..: NaN
    with pytest.raises(UsageError, match=r"module\(s\) \['4'\] hold NaN or inf"):
        run.compute_influence_all(test, hessian="none")


# --------------------------------------------------------------------------- query arguments
@pytest.mark.parametrize("kwargs, message", [
    ({"damping": -1.0}, "damping must be a finite number >= 0"),
    ({"damping": float("nan")}, "damping must be a finite number >= 0"),
    ({"damping": "big"}, "damping must be a finite number >= 0, 'auto', 'relative'"),
    ({"hessian": "fisher"}, "'hessian' is 'fisher'; allowed values"),
    ({"mode": "angle"}, "'mode' is 'angle'; allowed values"),
    ({"block_rows": 0}, "`block_rows` must be a positive integer"),
    ({"precondition": "yes"}, "precondition must be True or False"),
    ({"gather": "some"}, "gather='some' is not supported"),
    ({"topk": 0}, "topk must be a positive integer or None"),
    ({"topk": -3}, "topk must be a positive integer or None"),
    ({"topk": 2.5}, "topk must be a positive integer or None"),
    ({"topk": True}, "topk must be a positive integer or None"),
    ({"topk": 25}, r"topk=25 is larger than the log \(24 rows"),
])
def test_query_arguments_are_checked(tmp_path, kwargs, message):
    run, test = logged(tmp_path)
    with pytest.raises(UsageError, match=message):
        run.compute_influence_all(test, **kwargs)


def test_other_query_methods_check_damping(tmp_path):
    run, test = logged(tmp_path)
    with pytest.raises(UsageError, match="damping must be a finite number >= 0"):
        run.compute_self_influence(damping=-1.0)
    with pytest.raises(UsageError, match="damping must be a finite number >= 0"):
        run.compute_influence(test, test, damping=-1.0)
    with pytest.raises(UsageError, match="damping must be a finite number >= 0"):
        run.influence.preconditioner("raw", damping=-0.5)


def test_topk_with_out_is_refused(tmp_path):
    run, test = logged(tmp_path)
    out = tmp_path / "scores.safetensors"
    with pytest.raises(UsageError, match="topk=3 and out=.* together are not supported"):
        run.compute_influence_all(test, topk=3, out=str(out))
    assert not out.exists()


@pytest.mark.parametrize("hessian", ["raw", "kfac", "ekfac"])
def test_singular_curvature_without_damping_raises_naming_the_module(tmp_path, hessian):
    run, test = logged(tmp_path, n=2, shard_rows=None)  # 2 examples: rank-deficient covariances
    with pytest.raises(UsageError, match=r"Module '0'.*singular.*Pass damping > 0"):
        run.compute_influence_all(test, hessian=hessian, damping=0.0)
    scores = run.compute_influence_all(test, hessian=hessian, damping=0.1)["influence"]
    assert scores.isfinite().all()


# --------------------------------------------------------------------------- state files
@pytest.mark.parametrize("damaged", ["projections", "statistics"])
def test_a_damaged_state_file_is_refused_and_verify_names_it(tmp_path, capsys, damaged):
    """One flipped byte in a state file changes every query's projection or preconditioner:
    loading it is refused, and `logix verify` fails naming it."""
    run, _ = logged(tmp_path)
    flip_bytes(os.path.join(run.project_dir, "state", f"{damaged}.safetensors"), value=0x3F,
               count=2)
    fresh = logix.init("p", root_dir=str(tmp_path), rank=3)
    fresh.watch(make_mlp())
    named = f"{damaged}.safetensors' is damaged"
    with pytest.raises(LogFormatError, match=named):
        fresh.initialize_from_log()
    if damaged == "statistics":
        with pytest.raises(LogFormatError, match=named):
            logix.Attributor(run.project_dir)
    assert main(["verify", run.project_dir]) == 1
    assert named in capsys.readouterr().out


def test_a_damaged_checkpoint_file_is_refused():
    from logix.storage import state

    with tempfile.TemporaryDirectory() as project_dir:
        state.save_checkpoint_statistics(project_dir, "c0", {"m::forward": torch.eye(3)},
                                         {"lr": 0.1})
        assert state.load_checkpoint_statistics(project_dir, "c0")[1] == {"lr": 0.1}
        flip_bytes(os.path.join(project_dir, "state", state.checkpoint_file("c0")), count=1)
        with pytest.raises(LogFormatError, match="checkpoint-c0.safetensors' is damaged"):
            state.load_checkpoint_statistics(project_dir, "c0")


def test_state_files_without_a_checksum_still_load(tmp_path):
    """Statistics written by earlier releases carry no checksum: read as they are."""
    from safetensors.torch import load_file, save_file

    run, test = logged(tmp_path)
    before = run.compute_influence_all(test, hessian="kfac")["influence"]
    path = os.path.join(run.project_dir, "state", "statistics.safetensors")
    save_file(load_file(path), path)  # no metadata
    again = logix.Attributor(run.project_dir).compute_influence_all(test, hessian="kfac",
                                                                    progress=False)
    assert torch.allclose(again["influence"], before, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- hessian="auto"
def test_auto_does_not_hide_a_damaged_log(tmp_path):
    run, test = logged(tmp_path, setup=("kfac",))
    run.statistics.drop(EKFAC)  # so that "auto" has to look at the saved rows
    assert run.influence.available_hessians() == ["none", "kfac", "ekfac", "lissa", "full"]
    index = os.path.join(run.project_dir, "logs", "index-r0.jsonl")
    with open(index, "r+b") as f:
        f.write(b"{not json")  # the first of three lines: not a torn tail
    with pytest.raises(LogFormatError, match="line 1 is malformed"):
        run.influence.available_hessians()


def test_auto_without_saved_rows(tmp_path):
    model = make_mlp()
    run = logix.init("nolog", root_dir=str(tmp_path), rank=3)
    run.watch(model)
    run.add_lora()
    run.setup({"forward": ["covariance"], "backward": ["covariance"]})
    x, y = mlp_data(8)
    with run(data_id=list(range(8))):
        torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    assert run.influence.available_hessians() == ["none", "kfac"]


# --------------------------------------------------------------------------- train-norm cache
def test_norm_cache_tells_apart_curvatures_with_equal_eigenvalue_sums(tmp_path):
    run, test = logged(tmp_path, setup=("grad_cov",))
    _, train = run.reader().read_all()
    stats, key = run.statistics, ("0", "grad")
    spectrum = torch.arange(1.0, 10.0) * stats.counts[key]
    stats.sums[key] = torch.diag(spectrum)
    stats.version += 1
    run.compute_influence_all(test, hessian="raw", mode="cosine", damping=1.0)
    stats.sums[key] = torch.diag(spectrum.flip(0))  # the same eigenvalues, other eigenvectors
    stats.version += 1
    result = run.compute_influence_all(test, hessian="raw", mode="cosine", damping=1.0)
    blocks = [torch.linalg.inv(stats.get(m.name, "grad").double()
                               + torch.eye(m.dim, dtype=torch.float64)) for m in run.layout()]
    expected = brute_force(test.grads, train, torch.block_diag(*blocks), "cosine")
    torch.testing.assert_close(result["influence"].double(), expected, rtol=0, atol=1e-5)


def test_norm_cache_tells_apart_groups_with_equal_size_and_first_column(tmp_path):
    run, test = logged(tmp_path, setup=())
    _, train = run.reader().read_all()
    q, g = test.grads.double(), train.double()
    for other in ("2", "4"):  # modules '2' and '4' have the same width
        result = run.compute_influence_all(test, hessian="none", mode="cosine",
                                           influence_groups={"pair": ["0", other]})
        mask = torch.zeros(q.shape[1], dtype=torch.float64)
        for m in run.layout():
            if m.name in ("0", other):
                mask[m.columns] = 1
        expected = brute_force(q * mask, g * mask, torch.eye(q.shape[1], dtype=torch.float64),
                               "cosine")
        torch.testing.assert_close(result["groups"]["pair"].double(), expected, rtol=0,
                                   atol=1e-5)


# --------------------------------------------------------------------------- storage
def test_shards_appended_in_any_order_are_read_and_saved_in_rank_seq_order(tmp_path):
    run, _ = logged(tmp_path)
    ids, rows = run.reader().read_all()
    manifest = Manifest.load(run.project_dir)
    manifest.shards.reverse()
    reader = LogReader(run.project_dir, manifest)
    assert [s.seq for s in reader.shards] == [0, 1, 2]
    again_ids, again = reader.read_all()
    assert again_ids == ids and torch.equal(again, rows)
    assert [s["seq"] for s in manifest.to_dict()["shards"]] == [0, 1, 2]


def test_score_file_closes(tmp_path):
    path = str(tmp_path / "s.safetensors")
    save_scores(path, {"influence": torch.randn(2, 3), "src_ids": ["a", "b"],
                       "tgt_ids": [1, 2, 3]})

    def mapped():
        with open("/proc/self/maps") as f:
            return path in f.read()

    with open_scores(path) as scores:
        assert scores.row(1).shape == (3,)
    with pytest.raises(UsageError, match="is closed"):
        scores.row(0)
    if os.path.exists("/proc/self/maps"):
        assert not mapped()


# --------------------------------------------------------------------------- logix top --query
def test_top_query_takes_an_id_or_a_row(tmp_path, capsys):
    path = str(tmp_path / "s.safetensors")
    influence = torch.tensor([[1.0, 2.0], [3.0, -4.0], [0.5, 0.0]])
    save_scores(path, {"influence": influence, "src_ids": ["cat", 7, 0], "tgt_ids": ["a", "b"]})

    def top(query):
        code = main(["top", path, "--json", "--query", query])
        out = capsys.readouterr()
        return code, (json.loads(out.out) if code == 0 else out.err)

    assert [r["query"] for r in top("cat")[1]] == [0]
    assert [r["query"] for r in top("7")[1]] == [1]
    code, err = top("0")  # id 0 is row 2, and 0 is also a row number
    assert code == 2 and "ambiguous" in err and "'#0'" in err
    assert [r["query"] for r in top("#0")[1]] == [0]
    assert [r["query"] for r in top("#2")[1]] == [2]
    code, err = top("dog")
    assert code == 2 and "not a query id" in err and "cat" in err
