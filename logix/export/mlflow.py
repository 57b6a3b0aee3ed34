"""Export to MLflow: one run through `MlflowClient` (needs mlflow-skinny with SQLAlchemy and
alembic for a local SQLite store: pip install "logix[mlflow]").

Where (default): tracking URI `sqlite:///OUT/mlflow.db`, artifacts under `OUT/artifacts`
(`mlflow ui --backend-store-uri sqlite:///OUT/mlflow.db`); or any `tracking_uri` (a server,
`databricks`, ...). MLflow 3 refuses the plain-folder (`file:`) store unless
MLFLOW_ALLOW_FILE_STORE=true, which is why the default is SQLite.

What goes where (experiment: the project's name unless given):
    params     the log's summary (project, dtype, rows, row_width, modules, shards, ...)
    metrics    lds/<name> (mean), lds/<name>/per_query (step = query),
               brittleness/<name>/margin/test_<i> (step = k)
    artifacts  summary.json (what `logix show --json` prints), tables/modules.json,
               tables/topk-<score file>.json, tables/lds-<name>.json,
               tables/brittleness-<name>.json ({"columns", "data"} and the run tag that
               mlflow.log_table writes, so mlflow.load_table reads them),
               heatmaps/<score file>/query-<q>.png, evaluation/<name>.json (the result file)
    tags       logix.project_dir, logix.scores (the score files exported),
               mlflow.loggedArtifacts (the tables, as log_table records them)
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from typing import Optional

from logix.export.collect import Export, require

TRACKER = "MLflow"
LOGGED_ARTIFACTS = "mlflow.loggedArtifacts"  # mlflow.utils.mlflow_tags.MLFLOW_LOGGED_ARTIFACTS


def write(export: Export, out: str, name: Optional[str] = None,
          tracking_uri: Optional[str] = None, experiment: Optional[str] = None) -> str:
    """Log `export` as a new MLflow run; returns its run id. Without `tracking_uri` the store
    is `sqlite:///<out>/mlflow.db` with artifacts in `<out>/artifacts`."""
    if tracking_uri is None:  # the SQLite store needs SQLAlchemy (not in mlflow-skinny)
        require("sqlalchemy", "mlflow", TRACKER)
    mlflow = require("mlflow", "mlflow", TRACKER)
    artifact_location = None
    if tracking_uri is None:
        os.makedirs(out, exist_ok=True)
        tracking_uri = default_tracking_uri(out)
        artifact_location = os.path.abspath(os.path.join(out, "artifacts"))
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = experiment or export.project
    found = client.get_experiment_by_name(experiment)
    experiment_id = (found.experiment_id if found is not None else
                     client.create_experiment(experiment, artifact_location=artifact_location))
    topk = [t for t in export.tables if t.startswith("topk/")]
    run = client.create_run(experiment_id, run_name=name or export.default_name,
                            tags={"logix.project_dir": export.project_dir,
                                  "logix.scores": ", ".join(t[5:] for t in topk) or "none"})
    run_id = run.info.run_id
    status = "FAILED"
    try:
        _log(client, run_id, export)
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    return run_id


def default_tracking_uri(out: str) -> str:
    """The SQLite store an export to `out` writes without a tracking URI."""
    return "sqlite:///" + os.path.abspath(os.path.join(out, "mlflow.db"))


def _log(client, run_id: str, export: Export) -> None:
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    params = [Param(k, str(v)) for k, v in export.params.items()]
    metrics = []
    for ev in export.evaluations:
        key = _key(ev.name)
        if ev.kind == "lds":
            if ev.lds is not None:
                metrics.append(Metric(f"lds/{key}", ev.lds, now, 0))
            metrics += [Metric(f"lds/{key}/per_query", v, now, q)
                        for q, v in enumerate(ev.per_query) if v is not None]
        else:
            metrics += [Metric(f"brittleness/{key}/margin/test_{row[0]}", row[2], now, row[1])
                        for row in ev.table.rows if row[2] is not None]
    for start in range(0, max(len(params), len(metrics)), 100):  # the store's batch limit
        client.log_batch(run_id, metrics=metrics[start:start + 100],
                         params=params[start:start + 100])
    client.log_dict(run_id, export.summary, "summary.json")
    tables = {f"tables/{_key(name.replace('/', '-'))}.json": table
              for name, table in export.tables.items()}
    tables.update({f"tables/{ev.kind}-{_key(ev.name)}.json": ev.table
                   for ev in export.evaluations})
    for path, table in tables.items():
        client.log_dict(run_id, {"columns": table.columns, "data": table.rows}, path)
    # what log_table records beside its files: the MLflow UI and mlflow.load_table find
    # tables by this tag (log_table itself needs pandas, which mlflow-skinny does not bring)
    client.set_tag(run_id, LOGGED_ARTIFACTS, json.dumps(
        [{"path": path, "type": "table"} for path in tables]))
    for ev in export.evaluations:
        client.log_dict(run_id, ev.data, f"evaluation/{_key(ev.name)}.json")
    with tempfile.TemporaryDirectory() as tmp:
        for image in export.images:
            path = os.path.join(tmp, f"query-{image.step}.png")
            with open(path, "wb") as f:
                f.write(image.png)
            client.log_artifact(run_id, path, _key(image.tag.replace("heatmap/", "heatmaps/")))


def _key(name: str) -> str:
    """MLflow keys allow letters, digits, _ - . / and space; anything else becomes _."""
    return re.sub(r"[^\w\-./ ]", "_", str(name))
