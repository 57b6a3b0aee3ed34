"""Export to TensorBoard: event files written with torch's `SummaryWriter` (needs the
`tensorboard` package: pip install "logix[tensorboard]").

What goes where (one run folder per export; `tensorboard --logdir OUT`):
    text    summary, modules                  the log's summary and its modules (markdown tables)
    scalars summary/<key>                     rows, row_width, modules, shards, shard_bytes, ...
    text    topk/<score file>, step = query   k most helpful / harmful examples with their text
    images  heatmap/<score file>, step = query   per-token heat map against the top example
    scalars eval/<name>/lds (step 0), eval/<name>/lds_per_query (step = query)
    scalars eval/<name>/margin/test_<i> (step = k); text eval/<name> (the brittleness table)
"""

from __future__ import annotations

import io
from typing import Optional

from logix.export.collect import SUMMARY_SCALARS, Export, markdown_table, new_folder, require

TRACKER = "TensorBoard"


def write(export: Export, out: str, name: Optional[str] = None) -> str:
    """Write `export` as a new TensorBoard run under `out`; returns the run's folder."""
    require("tensorboard", "tensorboard", TRACKER)
    tb = require("torch.utils.tensorboard", "tensorboard", TRACKER)
    folder = new_folder(out, name or export.default_name)
    writer = tb.SummaryWriter(log_dir=folder)
    try:
        writer.add_text("summary", markdown_table(
            ["key", "value"], [[k, v] for k, v in export.params.items()]), 0)
        modules = export.tables["modules"]
        writer.add_text("modules", markdown_table(modules.columns, modules.rows), 0)
        for key in SUMMARY_SCALARS:
            if export.params.get(key) is not None:
                writer.add_scalar(f"summary/{key}", export.params[key], 0)
        for table_name, table in export.tables.items():
            if not table_name.startswith("topk/"):
                continue
            by_query = {}
            for row in table.rows:
                by_query.setdefault(row[0], []).append(row)
            for query, rows in by_query.items():
                head = rows[0]
                about = " ".join(str(v) for v in (head[2], head[3]) if v is not None)
                text = (f"query {query}: `{head[1]}`" + (f" ({about})" if about else "") +
                        "\n\n" + markdown_table(table.columns[4:], [r[4:] for r in rows]))
                writer.add_text(table_name, text, query)
        for image in export.images:
            writer.add_image(image.tag, _pixels(image.png), image.step, dataformats="HWC")
        for ev in export.evaluations:
            tag = f"eval/{ev.name}"
            if ev.kind == "lds":
                if ev.lds is not None:
                    writer.add_scalar(f"{tag}/lds", ev.lds, 0)
                for q, value in enumerate(ev.per_query):
                    if value is not None:
                        writer.add_scalar(f"{tag}/lds_per_query", value, q)
            else:
                for row in ev.table.rows:
                    test_index, k, margin = row[0], row[1], row[2]
                    if margin is not None:
                        writer.add_scalar(f"{tag}/margin/test_{test_index}", margin, k)
                writer.add_text(tag, markdown_table(ev.table.columns, ev.table.rows), 0)
        writer.flush()
    finally:
        writer.close()
    return folder


def _pixels(png: bytes):
    """[H, W, 3] uint8 of a PNG (add_image takes pixels and encodes them again)."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"))
