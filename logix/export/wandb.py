"""Export to Weights & Biases: one run through `wandb.init` (pip install "logix[wandb]").
Offline by default (`mode="offline"`): the run is written under `OUT/wandb/offline-run-*` (W&B
adds the `wandb` folder), and `wandb sync OUT/wandb/offline-run-*` uploads it later; `mode="online"` logs straight to the
server you are logged in to.

What goes where (project: the LogIX project's name unless given):
    config     the log's summary (project, dtype, rows, row_width, modules, shards, ...)
    summary    the same scalars under summary/<key>; lds/<name> (mean LDS)
    tables     summary/modules, topk/<score file> (k most helpful / harmful examples per query
               with their text and labels), lds/<name>/per_query, brittleness/<name>
    images     heatmap/<score file>: per-token heat maps, one per query (caption: the pair)
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

from logix.export.collect import Export, require

TRACKER = "Weights & Biases"


def write(export: Export, out: str, name: Optional[str] = None,
          project: Optional[str] = None, mode: str = "offline") -> str:
    """Log `export` as a new W&B run with its files under `out`; returns the run's folder."""
    wandb = require("wandb", "wandb", TRACKER)
    os.makedirs(out, exist_ok=True)
    settings = wandb.Settings(console="off", silent=True, disable_git=True, save_code=False,
                              x_disable_stats=True, x_save_requirements=False)
    others = wandb.run is not None  # the caller's own run, which must go on
    run = wandb.init(project=project or export.project, name=name or export.default_name,
                     dir=os.path.abspath(out), mode=mode, config=dict(export.params),
                     job_type="attribution", reinit="create_new", settings=settings)
    exit_code = 1
    try:
        with tempfile.TemporaryDirectory() as tmp:  # heat-map files live until logged
            data = {}
            for table_name, table in export.tables.items():
                key = "summary/modules" if table_name == "modules" else table_name
                data[key] = wandb.Table(columns=table.columns, data=table.rows,
                                        allow_mixed_types=True)
            for ev in export.evaluations:  # (the mean LDS goes to the summary as lds/<name>)
                key = f"lds/{ev.name}/per_query" if ev.kind == "lds" else ev.table.name
                data[key] = wandb.Table(
                    columns=ev.table.columns, data=ev.table.rows, allow_mixed_types=True)
            for n, image in enumerate(export.images):
                path = os.path.join(tmp, f"{n}.png")
                with open(path, "wb") as f:
                    f.write(image.png)
                data.setdefault(image.tag, []).append(
                    wandb.Image(path, caption=f"query {image.step}: {image.caption}"))
            run.log(data)
            run.summary.update({f"summary/{k}": v for k, v in export.params.items()})
            run.summary.update({f"lds/{ev.name}": ev.lds for ev in export.evaluations
                                if ev.kind == "lds" and ev.lds is not None})
            folder = os.path.dirname(run.dir)
            exit_code = 0
    finally:
        run.finish(exit_code=exit_code)
        if not others:
            # finish() returns before wandb-core has written the run's last records; teardown
            # waits for them, so the offline run is complete (and syncable) on return
            wandb.teardown()
    return folder
