"""Files are refused where they do not belong, and bad input gets a LogIX error, not a Python one:
shard headers stay under safetensors' limit whatever the id length; statistics and score files
record the log they were computed from; one structural check of the manifest guards scoring and
`logix verify` alike; deep JSON, huge sizes, empty batches, long integers and bad YAML are named."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import logix
from conftest import make_mlp
from logix.errors import ConfigError, LogFormatError, UsageError
from logix.storage import writer
from logix.storage.format import MAX_HEADER, read_header
from logix.storage.reader import LogReader
from logix.storage.scores import load_scores, open_scores, save_scores
from logix.storage.verify import verify
from test_storage import ALL, log_project, rewrite_shard_entries


def stats_path(project_dir):
    return os.path.join(project_dir, "state", "statistics.safetensors")


def edit_manifest(project_dir, change):
    path = os.path.join(project_dir, "manifest.json")
    raw = json.load(open(path))
    change(raw)
    json.dump(raw, open(path, "w"))


def query_log(root):
    """Two queries projected like log_project's rows (same model, rank and seed)."""
    model = make_mlp(seed=0)
    run = logix.init("query", root_dir=str(root))
    run.watch(model).add_lora(rank=3)
    run.eval()
    with run(data_id=["q0", "q1"]):
        model(torch.randn(2, 6)).pow(2).sum().backward()
    return run.get_log(copy=True)


# --------------------------------------------------------------------------- 7: header bound
def test_the_ids_header_budget_is_well_under_safetensors_limit():
    assert 0 < writer.IDS_HEADER_BUDGET <= MAX_HEADER // 2


def test_long_ids_cut_shards_early_and_stay_readable(new_run, tmp_root, monkeypatch):
    monkeypatch.setattr(writer, "IDS_HEADER_BUDGET", 12_000, raising=False)
    ids = [f"{k:03d}" + "é" * 1600 for k in range(12)]  # ~11 KB each in the header JSON
    run = new_run("long", flush_threshold=None)
    model = make_mlp(seed=0)
    run.watch(model).add_lora(rank=2)
    run.setup({"grad": ["log"]}).save(True)
    for start in range(0, 12, 4):
        with run(data_id=ids[start:start + 4]):
            model(torch.randn(4, 6)).pow(2).sum().backward()
    run.finalize()
    reader = LogReader(run.project_dir)
    assert len(reader.shards) == 12 and reader.data_ids() == ids
    for shard in reader.shards:
        header, _, _ = read_header(os.path.join(run.project_dir, shard.file))
        assert len(json.dumps(header["__metadata__"])) <= 12_000
    assert verify(run.project_dir).ok


def test_an_id_over_the_length_limit_is_refused_at_start(new_run):
    from logix.storage.data_ids import MAX_ID_CHARS

    assert 14 * MAX_ID_CHARS + 2 < writer.IDS_HEADER_BUDGET  # worst escaping still fits
    run = new_run("long_id")
    run.watch(make_mlp(seed=0)).add_lora(rank=2)
    run.setup({"grad": ["log"]}).save(True)
    with pytest.raises(UsageError, match="short hash"):
        run.start(data_id=["x" * (MAX_ID_CHARS + 1)])


def test_an_id_longer_than_the_whole_budget_is_refused(new_run, monkeypatch):
    monkeypatch.setattr(writer, "IDS_HEADER_BUDGET", 1_000, raising=False)
    run = new_run("huge")
    model = make_mlp(seed=0)
    run.watch(model).add_lora(rank=2)
    run.setup({"grad": ["log"]}).save(True)
    with pytest.raises(UsageError, match="shorter ids"):
        with run(data_id=["x" * 2_000]):
            model(torch.randn(1, 6)).pow(2).sum().backward()


# --------------------------------------------------------------------------- 9: fingerprints
@pytest.fixture
def two_projects(new_run, tmp_root):
    """Projects a and b of the same layout and different examples (9 and 6 rows)."""
    log_project(new_run, "a")
    log_project(new_run, "b", batch_sizes=(2, 4), first_id=100)
    return os.path.join(tmp_root, "a"), os.path.join(tmp_root, "b")


def test_statistics_copied_from_another_project_are_refused(two_projects):
    a, b = two_projects
    logix.Attributor(b)  # its own statistics load
    shutil.copy(stats_path(a), stats_path(b))
    with pytest.raises(LogFormatError, match="copied from another project") as e:
        logix.Attributor(b)
    fingerprints = [json.load(open(os.path.join(p, "manifest.json")))["fingerprint"]
                    for p in (a, b)]
    assert all(f in str(e.value) for f in fingerprints)
    report = verify(b)
    assert not report.ok and any("copied from another project" in m for m in report.errors)


def test_statistics_record_the_rows_and_ids_they_describe(two_projects):
    a, _ = two_projects
    with safe_open(stats_path(a), framework="pt") as f:
        recorded = json.loads(f.metadata()["describes"])
    manifest = json.load(open(os.path.join(a, "manifest.json")))
    assert recorded["fingerprint"] == manifest["fingerprint"] and recorded["rows"] == 9
    ids = json.dumps(LogReader(a).data_ids()).encode()
    assert recorded["ids"] == f"xxh3:{xxhash.xxh3_64(ids).hexdigest()}"


def test_verify_finds_statistics_of_other_examples_with_the_same_fingerprint(new_run, tmp_root):
    log_project(new_run, "a")
    log_project(new_run, "b", first_id=100)  # as many rows, other ids
    a, b = (os.path.join(tmp_root, p) for p in "ab")
    shutil.copy(stats_path(a), stats_path(b))
    fingerprint = json.load(open(os.path.join(a, "manifest.json")))["fingerprint"]
    edit_manifest(b, lambda m: m.update(fingerprint=fingerprint))
    report = verify(b)
    assert any("computed from other examples" in m for m in report.errors), report.errors


def test_statistics_of_an_earlier_release_load_unverified(two_projects):
    a, _ = two_projects
    with safe_open(stats_path(a), framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "describes"}
    save_file(load_file(stats_path(a)), stats_path(a), metadata=metadata)
    assert logix.Attributor(a).statistics.counts
    report = verify(a)
    assert report.ok and any("records no log" in m for m in report.warnings)


def test_a_log_appended_to_after_its_statistics_keeps_scoring(new_run, tmp_root):
    log_project(new_run, "grow")
    project_dir = os.path.join(tmp_root, "grow")
    run = new_run("grow")
    model = make_mlp(seed=0)
    run.watch(model).add_lora(rank=3)
    run.setup(ALL).save(True)
    with pytest.warns(UserWarning, match="already holds a log"):
        with run(data_id=["new0", "new1"]):
            model(torch.randn(2, 6)).pow(2).sum().backward()
    run.flush()
    attributor = logix.Attributor(project_dir)  # statistics of 9 of the 11 rows: accepted
    assert attributor.statistics.counts[("0", "grad")] == 9
    report = verify(project_dir)
    assert report.ok and any("describes 9 of the log's 11 rows" in m for m in report.warnings)
    run.finalize()
    assert logix.Attributor(project_dir).statistics.counts[("0", "grad")] == 11
    assert not [m for m in verify(project_dir).warnings if "describes" in m]


def test_a_score_file_copied_into_another_project_is_refused(two_projects, tmp_path):
    a, b = two_projects
    result = logix.Attributor(a).compute_influence_all(query_log(tmp_path), progress=False)
    assert result["meta"]["fingerprint"] == json.load(open(os.path.join(a, "manifest.json"))
                                                      )["fingerprint"]
    own = save_scores(os.path.join(a, "scores", "s.safetensors"), result)
    assert load_scores(own)["tgt_ids"] == result["tgt_ids"]  # inside its own project
    copied = os.path.join(b, "scores", "s.safetensors")
    os.makedirs(os.path.dirname(copied))
    shutil.copy(own, copied)
    with pytest.raises(LogFormatError, match="copied from another project"):
        open_scores(copied)
    with pytest.raises(LogFormatError, match="copied from another project"):
        load_scores(own, project_dir=b)
    from logix.dashboard.data import Dashboard, DashboardError

    with pytest.raises(DashboardError, match="copied from another project") as e:
        Dashboard([b]).scores("b", "scores/s.safetensors")
    assert e.value.status == 422


def test_score_files_written_by_out_record_their_log(two_projects, tmp_path):
    a, b = two_projects
    out = os.path.join(b, "out.safetensors")
    logix.Attributor(a).compute_influence_all(query_log(tmp_path), out=out, progress=False)
    with pytest.raises(LogFormatError, match="copied from another project"):
        open_scores(out)
    legacy = str(tmp_path / "legacy.safetensors")  # no "describes": read as it is
    save_file({"influence": torch.zeros(1, 2)}, legacy,
              metadata={"src_ids": '["q"]', "tgt_ids": '["a", "b"]'})
    assert open_scores(legacy, project_dir=b).tgt_ids == ["a", "b"]


# --------------------------------------------------------------------------- 10: structure
@pytest.fixture
def project(new_run, tmp_root):
    log_project(new_run, "s", shard_rows=4)
    return os.path.join(tmp_root, "s")


def scores_refused(project_dir, match, tmp_path):
    query = query_log(tmp_path)
    with pytest.raises(LogFormatError, match=match):
        logix.Attributor(project_dir).compute_influence_all(query, progress=False)
    with pytest.raises(LogFormatError, match=match):
        LogReader(project_dir)
    report = verify(project_dir)
    assert not report.ok and any(match in m for m in report.errors), report.errors


def test_a_shard_listed_twice_is_not_scored(project, tmp_path):
    rewrite_shard_entries(project, lambda s: s)
    edit_manifest(project, lambda m: m.update(shards=m["shards"] + m["shards"][:1],
                                              rows=m["rows"] + m["shards"][0]["rows"]))
    scores_refused(project, "named more than once", tmp_path)


@pytest.mark.parametrize("where", ["absolute", "dotdot", "subfolder"])
def test_a_shard_outside_logs_is_never_read(project, tmp_path, where):
    first = json.load(open(os.path.join(project, "manifest.json")))["shards"][0]["file"]
    outside = str(tmp_path / "outside" / os.path.basename(first))
    os.makedirs(os.path.dirname(outside))
    shutil.copy(os.path.join(project, first), outside)
    name = {"absolute": outside, "dotdot": os.path.relpath(outside, project),
            "subfolder": "logs/x/" + os.path.basename(first)}[where]

    def move(m):
        m["shards"][0]["file"] = name
    edit_manifest(project, move)
    scores_refused(project, "is not a shard name inside logs/", tmp_path)


# --------------------------------------------------------------------------- 11: LogIX errors
def test_a_deeply_nested_manifest_is_a_format_error(project):
    with open(os.path.join(project, "manifest.json"), "w") as f:
        f.write("[" * 100_000 + "]" * 100_000)
    with pytest.raises(LogFormatError, match="nested too deeply"):
        verify(project)
    with pytest.raises(LogFormatError, match="nested too deeply"):
        LogReader(project)


@pytest.mark.parametrize("rows", [10 ** 18, 1e18])
def test_absurd_row_counts_are_format_errors(project, rows, tmp_path):
    def inflate(m):
        m["shards"][0]["rows"] = rows
        m.pop("rows")
    edit_manifest(project, inflate)
    with pytest.raises(LogFormatError):
        LogReader(project)
    with pytest.raises(LogFormatError):
        logix.Attributor(project).compute_influence_all(query_log(tmp_path), progress=False)


def test_an_empty_batch_is_refused_at_start(new_run):
    run = new_run("empty")
    model = make_mlp(seed=0)
    run.watch(model).add_lora(rank=2)
    run.setup({"grad": ["log"]}).save(True)
    with pytest.raises(UsageError, match="no data ids"):
        run.start(data_id=[])


def test_an_integer_id_too_long_for_json_is_refused_at_start(new_run):
    run = new_run("bigint")
    model = make_mlp(seed=0)
    run.watch(model).add_lora(rank=2)
    run.setup({"grad": ["log"]}).save(True)
    with pytest.raises(UsageError, match="Pass such ids as str"):
        with run(data_id=[10 ** 5000]):
            model(torch.randn(1, 6)).pow(2).sum().backward()
    with run(data_id=[10 ** 4000]):  # long, but JSON takes it
        model(torch.randn(1, 6)).pow(2).sum().backward()
    run.finalize()
    assert LogReader(run.project_dir).data_ids() == [10 ** 4000]


def test_invalid_yaml_names_the_file_and_line(tmp_path, tmp_root):
    path = tmp_path / "config.yaml"
    path.write_text("logging:\n  flush_threshold: 3\n bad: [1\n")
    with pytest.raises(ConfigError, match=r"config.yaml' is not valid YAML, line 3"):
        logix.init("p", config=str(path), root_dir=tmp_root)


def test_logix_top_refuses_content_of_another_project(two_projects, tmp_path, capsys):
    from logix.cli import main

    a, b = two_projects
    result = logix.Attributor(a).compute_influence_all(query_log(tmp_path), progress=False)
    path = save_scores(str(tmp_path / "s.safetensors"), result)
    assert main(["top", path, "--content", a]) == 0
    capsys.readouterr()
    assert main(["top", path, "--content", b]) == 1
    assert "copied from another project" in " ".join(capsys.readouterr().err.split())


def test_a_header_over_the_safetensors_limit_is_named_not_called_truncated(tmp_path):
    from logix.storage.format import MAX_HEADER, read_header

    path = tmp_path / "big-header.safetensors"
    with open(path, "wb") as f:
        f.write((MAX_HEADER + 1).to_bytes(8, "little"))
        f.truncate(MAX_HEADER + 64)  # sparse: no 100 MB written
    with pytest.raises(LogFormatError, match="over the 100000000-byte limit") as caught:
        read_header(str(path))
    assert "truncated" not in str(caught.value)
