"""Launched by tests/test_index.py with torchrun (2 processes, gloo).

    python index_search.py PROJECT_DIR QUERIES_FILE OUT_FILE
Each rank indexes its own shards (a flat index and a sketched IVF index), then searches them;
rank 0 saves both merged searches and the distributed exact streaming top-k to OUT_FILE.
"""

import sys

import torch
import torch.distributed as dist

import logix
from logix.log import StepRows


def main(project_dir: str, queries_file: str, out_file: str) -> None:
    dist.init_process_group("gloo")
    att = logix.Attributor(project_dir)
    query = StepRows.load(queries_file)
    flat = att.build_index("flat", progress=False)
    ivf = att.build_index("ivf", sketch=8, nlist=2, nprobe=2, progress=False)
    result = {
        "index_names": [flat.name, ivf.name],
        "stream": att.compute_influence_all(query, topk=6, hessian="ekfac", progress=False),
        "flat": att.search(query, k=6, candidates=20, bottom=True, hessian="ekfac",
                           index=flat.name),
        "ivf": att.search(query, k=6, candidates=200, bottom=True, hessian="ekfac",
                          index=ivf.name)}
    if dist.get_rank() == 0:
        torch.save(result, out_file)


if __name__ == "__main__":
    from teardown import exit_cleanly

    main(*sys.argv[1:4])
    exit_cleanly()
