"""Launched by tests/test_faults.py: one process writing into a project that another process
may be writing into at the same time.

    python concurrent_writer.py MODE ROOT PROJECT PREFIX N

Imports torch and LogIX, prints "ready", waits for a line on stdin (so that two workers start
together), then:
    log       logs N rows with ids f"{PREFIX}{i}" (shards of 7 rows), finalizes
    hold      logs N rows, flushes, prints "flushed", waits for a second line, then finalizes
              (or is killed before)
    describe  calls describe() N times, one id f"{PREFIX}{i}" each
Exit status 0 when done, 3 when LogIX refused with a UsageError (printed on stderr).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import logix  # noqa: E402
from conftest import make_mlp  # noqa: E402
from logix.errors import UsageError  # noqa: E402
from logix.storage.content import describe  # noqa: E402

BATCH = 10


def log(root: str, project: str, prefix: str, n: int, hold: bool) -> None:
    model = make_mlp(seed=0)  # every worker logs the same model: the layouts match
    run = logix.init(project, root_dir=root, shard_rows=7)
    run.watch(model).add_lora(rank=2).setup({"grad": ["log"]}).save(True)
    g = torch.Generator().manual_seed(len(prefix))
    for start in range(0, n, BATCH):
        ids = [f"{prefix}{i}" for i in range(start, min(start + BATCH, n))]
        with run(data_id=ids):
            model(torch.randn(len(ids), 6, generator=g)).pow(2).sum().backward()
    if hold:
        run.flush()
        print("flushed", flush=True)
        sys.stdin.readline()
    run.finalize()


def main(mode: str, root: str, project: str, prefix: str, n: str) -> int:
    torch.set_num_threads(1)
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        if mode == "describe":
            for i in range(int(n)):
                describe(os.path.join(root, project), [f"{prefix}{i}"], texts=[f"text {i}"])
        else:
            log(root, project, prefix, int(n), hold=mode == "hold")
    except UsageError as e:
        print(f"UsageError: {e}", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
