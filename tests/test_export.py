"""logix.export against the real trackers: each test writes real files with the tracker's own
package and reads them back with that package's reader (TensorBoard's EventAccumulator,
MlflowClient over a SQLite store, W&B's own record protos over an offline run's log), then
checks the exported values against the project they came from: top-k ids, scores and example
text, the LDS, a heat map's size, the summary's row count."""

from __future__ import annotations

import glob
import json
import os
import struct
import sys

import pytest
import torch

import dashboard_fixtures
from dashboard_fixtures import N_TEST, N_TRAIN

import logix.export
from logix.cli import main
from logix.errors import LogFormatError, UsageError
from logix.export.collect import TOPK_COLUMNS

# the fixture's corrupt score file is left out of every export, with a warning (tested once)
pytestmark = pytest.mark.filterwarnings("ignore:scores/broken.safetensors left out")
root = dashboard_fixtures.root  # pytest fixture: a logged project with scores and evaluations
K = 3
QUERY_TEXTS = ["".join(t) for t in dashboard_fixtures.TOKENS]  # the fixture's query texts


@pytest.fixture(autouse=True)
def no_telemetry(monkeypatch):
    """MLflow 3 sends usage telemetry unless told not to; tests stay on this machine."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")


@pytest.fixture(scope="module")
def project(root):
    return root["run"].project_dir


@pytest.fixture(scope="module")
def expected(root, project):
    """What every tracker must receive, computed here from the scores themselves."""
    influence = root["result"]["influence"]  # [N_TEST, N_TRAIN]
    tgt = root["result"]["tgt_ids"]
    topk = {}
    for q in range(N_TEST):
        top = torch.topk(influence[q], K)
        bottom = torch.topk(influence[q], K, largest=False)
        topk[q] = {"helpful": [(tgt[int(i)], float(v)) for v, i in zip(top.values, top.indices)],
                   "harmful": [(tgt[int(i)], float(v))
                               for v, i in zip(bottom.values, bottom.indices)]}
    export = logix.export.collect(project, k=K)
    return {"topk": topk, "export": export,
            "heatmap_size": export.images[0].size if export.images else None}


def png_size(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


# --------------------------------------------------------------------------- collect
def test_collect_reads_scores_content_heatmaps_and_results(root, project, expected, tmp_path):
    export = expected["export"]
    assert export.project == "demo" and export.params["rows"] == N_TRAIN
    assert export.params["modules"] == len(export.tables["modules"].rows) == 2
    assert sorted(export.tables) == ["modules", "topk/test", "topk/tokens"]
    table = export.tables["topk/test"]
    assert table.columns == TOPK_COLUMNS and len(table.rows) == N_TEST * 2 * K
    for q in range(N_TEST):
        for kind in ("helpful", "harmful"):
            rows = [r for r in table.records() if r["query"] == q and r["kind"] == kind]
            assert [(r["train_id"], pytest.approx(r["score"])) for r in rows] == \
                expected["topk"][q][kind]
            assert [r["train_text"] for r in rows] == [f"train example {r['train_id']}"
                                                       for r in rows]
            assert {r["query_id"] for r in rows} == {f"q{q}"}
    assert table.records()[0]["query_text"] == QUERY_TEXTS[0]
    # heat maps: only the score file with per-token scores, one per query
    assert [(i.tag, i.step) for i in export.images] == [("heatmap/tokens", q)
                                                        for q in range(N_TEST)]
    width, height = export.images[0].size
    assert width > 500 and height > 50
    lds, = [e for e in export.evaluations if e.kind == "lds"]
    assert lds.lds == pytest.approx(0.4) and lds.per_query[1] is None
    brittle, = [e for e in export.evaluations if e.kind == "brittleness"]
    assert brittle.table.rows[1][:3] == [0, 4, pytest.approx(-0.1)]
    # the corrupt score file of the fixture is left out, with a note saying why
    assert any("broken.safetensors" in n for n in export.notes)
    with pytest.warns(UserWarning, match="broken.safetensors left out: .* not a readable"):
        logix.export.to_tensorboard(project, out=str(tmp_path),
                                    k=1, queries=1, heatmaps=False)


def test_collect_refuses_what_it_cannot_read(tmp_path, project):
    with pytest.raises(UsageError, match="no manifest.json"):
        logix.export.collect(str(tmp_path))
    with pytest.raises(LogFormatError, match="manifest.json' is not a readable safetensors"):
        logix.export.collect(project, scores=[os.path.join(project, "manifest.json")])
    with pytest.raises(UsageError, match="not a LogIX evaluation result file"):
        logix.export.collect(project, results=[os.path.join(project, "manifest.json")])
    with pytest.raises(UsageError, match="score file '.*nothing.safetensors' does not exist"):
        logix.export.collect(project, scores=os.path.join(project, "nothing.safetensors"))


def test_same_names_stay_apart(project, tmp_path):
    """Two score files named alike and two results saved under one name get -2 suffixes."""
    import shutil

    other = tmp_path / "elsewhere"
    other.mkdir()
    copy = shutil.copy(os.path.join(project, "scores", "test.safetensors"), other)
    lds = os.path.join(project, "evaluation", "lds.json")
    export = logix.export.collect(project, scores=[os.path.join(project, "scores",
                                                                "test.safetensors"), copy],
                                  results=[lds, shutil.copy(lds, other)], heatmaps=False)
    assert sorted(export.tables) == ["modules", "topk/test", "topk/test-2"]
    assert [e.name for e in export.evaluations] == ["lds", "lds-2"]
    assert export.evaluations[1].table.name == "lds/lds-2"
    with pytest.raises(UsageError, match="Unknown tracker 'neptune'"):
        logix.export.write(logix.export.collect(project), "neptune")


def test_missing_tracker_names_the_extra(project, tmp_path, monkeypatch):
    for module, call in (("wandb", logix.export.to_wandb),
                         ("tensorboard", logix.export.to_tensorboard),
                         ("mlflow", logix.export.to_mlflow)):
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
        with pytest.raises(UsageError, match=rf'pip install "logix\[{module}\]"'):
            call(project, out=str(tmp_path / module), heatmaps=False)
        monkeypatch.undo()


# --------------------------------------------------------------------------- TensorBoard
def test_tensorboard_round_trip(project, expected, tmp_path):
    pytest.importorskip("tensorboard")  # in logix[test]; skips only where not installed
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = logix.export.to_tensorboard(project, out=str(tmp_path), k=K)
    assert os.path.dirname(folder) == str(tmp_path) and os.path.basename(folder) == "logix-demo"
    again = logix.export.to_tensorboard(project, out=str(tmp_path), k=K, heatmaps=False)
    assert again.endswith("logix-demo-2")  # a second export is a second run
    events = EventAccumulator(folder, size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    events.Reload()

    def text(tag):
        return {e.step: e.tensor_proto.string_val[0].decode()
                for e in events.Tensors(f"{tag}/text_summary")}

    def scalars(tag):
        return {e.step: e.value for e in events.Scalars(tag)}

    assert scalars("summary/rows") == {0: N_TRAIN}
    assert scalars("summary/modules") == {0: 2}
    assert "| rows | 24 |" in text("summary")[0]
    assert text("modules")[0].count("| Linear |") == 2
    tables = text("topk/test")
    assert sorted(tables) == list(range(N_TEST))  # one step per query
    for q, page in tables.items():
        lines = page.splitlines()
        assert lines[0].startswith(f"query {q}: `q{q}`")
        for kind in ("helpful", "harmful"):
            rows = [line.split(" | ") for line in lines if line.startswith(f"| {kind} |")]
            assert [(int(r[2]), float(r[3])) for r in rows] == [
                (i, pytest.approx(s, rel=1e-5)) for i, s in expected["topk"][q][kind]]
            assert [r[5].rstrip(" |") for r in rows] == [
                f"train example {i}" for i, _ in expected["topk"][q][kind]]
    images = events.Images("heatmap/tokens")
    assert [i.step for i in images] == list(range(N_TEST))
    for image in images:
        assert (image.width, image.height) == expected["heatmap_size"]
        assert png_size(image.encoded_image_string) == expected["heatmap_size"]
    assert scalars("eval/lds/lds") == {0: pytest.approx(0.4)}
    assert scalars("eval/lds/lds_per_query") == {0: pytest.approx(0.2), 2: pytest.approx(0.6)}
    assert scalars("eval/brittle/margin/test_0") == {2: pytest.approx(0.5),
                                                     4: pytest.approx(-0.1)}
    assert "| 0 | 4 | -0.1 | 1.5 | 4 | 0.5 | 1.2 |" in text("eval/brittle")[0]


# --------------------------------------------------------------------------- MLflow
def test_mlflow_round_trip(project, expected, tmp_path):
    pytest.importorskip("mlflow")  # in logix[test]; skips only where not installed
    pytest.importorskip("sqlalchemy")
    from mlflow import MlflowClient

    run_id = logix.export.to_mlflow(project, out=str(tmp_path), k=K)
    second = logix.export.to_mlflow(project, out=str(tmp_path), k=K, name="again",
                                    heatmaps=False)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("demo")
    runs = client.search_runs([experiment.experiment_id])
    assert {r.info.run_id for r in runs} == {run_id, second}  # one experiment, two runs
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "logix-demo"
    assert run.data.params["rows"] == str(N_TRAIN) and run.data.params["modules"] == "2"
    assert run.data.params["dtype"] == "float32"
    assert run.data.tags["logix.project_dir"] == os.path.abspath(project)
    assert run.data.metrics["lds/lds"] == pytest.approx(0.4)
    history = client.get_metric_history(run_id, "lds/lds/per_query")
    assert {m.step: m.value for m in history} == {0: pytest.approx(0.2), 2: pytest.approx(0.6)}
    margins = client.get_metric_history(run_id, "brittleness/brittle/margin/test_0")
    assert {m.step: m.value for m in margins} == {2: pytest.approx(0.5), 4: pytest.approx(-0.1)}

    def artifact(path):
        local = client.download_artifacts(run_id, path, str(tmp_path / "download"))
        with open(local, "rb") as f:
            return f.read()

    names = {a.path for a in client.list_artifacts(run_id, "tables")}
    assert names == {"tables/modules.json", "tables/topk-test.json", "tables/topk-tokens.json",
                     "tables/lds-lds.json", "tables/brittleness-brittle.json"}
    # the tag by which the MLflow UI and mlflow.load_table find tables, as log_table writes it
    tagged = json.loads(run.data.tags["mlflow.loggedArtifacts"])
    assert {t["path"] for t in tagged} == names and {t["type"] for t in tagged} == {"table"}
    summary = json.loads(artifact("summary.json"))
    assert summary["rows"] == N_TRAIN and len(summary["modules"]) == 2
    table = json.loads(artifact("tables/topk-test.json"))
    assert table["columns"] == TOPK_COLUMNS and len(table["data"]) == N_TEST * 2 * K
    records = [dict(zip(table["columns"], row)) for row in table["data"]]
    for q in range(N_TEST):
        for kind in ("helpful", "harmful"):
            rows = [r for r in records if r["query"] == q and r["kind"] == kind]
            assert [(r["train_id"], pytest.approx(r["score"])) for r in rows] == \
                expected["topk"][q][kind]
            assert {r["query_text"] for r in rows} == {QUERY_TEXTS[q]}
            assert [r["train_text"] for r in rows] == [f"train example {r['train_id']}"
                                                       for r in rows]
    assert json.loads(artifact("evaluation/lds.json"))["lds"] == pytest.approx(0.4)
    maps = sorted(a.path for a in client.list_artifacts(run_id, "heatmaps/tokens"))
    assert maps == [f"heatmaps/tokens/query-{q}.png" for q in range(N_TEST)]
    assert png_size(artifact(maps[0])) == expected["heatmap_size"]


# --------------------------------------------------------------------------- W&B
BLOCK, HEADER = 32768, 7  # the .wandb log: LevelDB-style records in 32 KiB blocks


def wandb_records(path):
    """Every record of an offline run's .wandb file, parsed with wandb's own protobuf classes
    (wandb 0.31 has no Python reader of its own: wandb-core reads these files)."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, parts, out = HEADER, [], []
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        parts.append(data[pos + HEADER:pos + HEADER + length])
        pos += HEADER + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            out.append(record)
            parts = []
    return out


def merged(items):
    """{key: value} of history / summary items (nested keys as nested dicts)."""
    out = {}
    for item in items:
        keys = list(item.nested_key) or [item.key]
        target = out
        for key in keys[:-1]:
            target = target.setdefault(key, {})
        target[keys[-1]] = json.loads(item.value_json)
    return out


def test_wandb_offline_round_trip(project, expected, tmp_path):
    pytest.importorskip("wandb")  # in logix[test]; skips only where not installed

    folder = logix.export.to_wandb(project, out=str(tmp_path), k=K)
    assert os.path.basename(folder).startswith("offline-run-")
    log, = glob.glob(os.path.join(folder, "run-*.wandb"))
    records = wandb_records(log)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds.count("exit") == 1 and records[[i for i, k in enumerate(kinds)
                                                 if k == "exit"][0]].exit.exit_code == 0
    run, = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "demo" and run.display_name == "logix-demo"
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["rows"] == N_TRAIN and config["modules"] == 2
    history = merged(i for r in records if r.WhichOneof("record_type") == "history"
                     for i in r.history.item)
    summary = merged(u for r in records if r.WhichOneof("record_type") == "summary"
                     for u in r.summary.update)
    assert summary["summary/rows"] == N_TRAIN and summary["lds/lds"] == pytest.approx(0.4)
    # tables stay in the summary too (what the W&B UI shows them from)
    assert {summary[k]["_type"] for k in ("topk/test", "lds/lds/per_query",
                                          "brittleness/brittle")} == {"table-file"}

    def media(entry):
        with open(os.path.join(folder, "files", entry["path"]), "rb") as f:
            return f.read()

    table = history["topk/test"]
    assert table["_type"] == "table-file" and table["nrows"] == N_TEST * 2 * K
    data = json.loads(media(table))
    assert data["columns"] == TOPK_COLUMNS
    records_ = [dict(zip(data["columns"], row)) for row in data["data"]]
    for q in range(N_TEST):
        for kind in ("helpful", "harmful"):
            rows = [r for r in records_ if r["query"] == q and r["kind"] == kind]
            assert [(r["train_id"], pytest.approx(r["score"])) for r in rows] == \
                expected["topk"][q][kind]
            assert [r["train_text"] for r in rows] == [f"train example {r['train_id']}"
                                                       for r in rows]
    assert history["summary/modules"]["nrows"] == 2
    lds = json.loads(media(history["lds/lds/per_query"]))
    assert lds["data"] == [[0, pytest.approx(0.2)], [1, None], [2, pytest.approx(0.6)]]
    brittle = json.loads(media(history["brittleness/brittle"]))
    assert [0, 4, pytest.approx(-0.1)] == brittle["data"][1][:3]
    images = history["heatmap/tokens"]
    assert images["_type"] == "images/separated" and images["count"] == N_TEST
    assert [images["width"], images["height"]] == list(expected["heatmap_size"])
    assert images["captions"][0].startswith("query 0: query 'q0' x training example")
    pngs = sorted(glob.glob(os.path.join(folder, "files", "media", "images", "**", "*.png"),
                            recursive=True))
    assert len(pngs) == N_TEST
    with open(pngs[0], "rb") as f:
        assert png_size(f.read()) == expected["heatmap_size"]


def test_wandb_export_leaves_the_callers_run_alone(project, tmp_path):
    """An export in the middle of a training script's own W&B run neither finishes nor replaces
    that run (the export is a run of its own, reinit="create_new")."""
    wandb = pytest.importorskip("wandb")

    mine = wandb.init(project="training", dir=str(tmp_path / "mine"), mode="offline",
                      settings=wandb.Settings(silent=True, console="off", disable_git=True))
    try:
        folder = logix.export.to_wandb(project, out=str(tmp_path / "export"), k=1, queries=1,
                                       heatmaps=False)
        assert wandb.run is mine
        wandb.log({"loss": 1.0})  # the module-level shortcut still reaches the caller's run
        assert folder.startswith(str(tmp_path / "export")) and not folder.endswith(mine.id)
    finally:
        mine.finish()
        wandb.teardown()


# --------------------------------------------------------------------------- CLI
def test_cli_export(project, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    code = main(["export", project, "--to", "tensorboard", "--out", str(tmp_path), "--k", "2",
                 "--scores", os.path.join(project, "scores", "test.safetensors"),
                 "--results", os.path.join(project, "evaluation", "lds.json")])
    out = capsys.readouterr()
    assert code == 0, out.err
    folder = os.path.join(str(tmp_path), "logix-demo")
    assert folder in out.out and os.listdir(folder)
    assert "1 score file, 0 heat maps, 1 result file" in out.out
    assert out.err == ""  # named files only: the corrupt one of the folder is not looked at
    assert main(["export", project, "--to", "neptune"]) == 2
    assert main(["export", str(tmp_path), "--to", "wandb"]) == 2  # not a project folder
    assert "no manifest.json" in capsys.readouterr().err
