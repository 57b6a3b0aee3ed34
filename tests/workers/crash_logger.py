"""Launched by tests/test_reliability.py: a fork server for the SIGKILL crash tests.

    python crash_logger.py ROOT PROJECT BATCH SHARD_ROWS QUEUE_SIZE FINALIZE_EVERY

Importing torch costs seconds on a busy machine, so this process imports it once, prints
"ready", then serves one attempt per line read on stdin: it forks a child that logs into
ROOT/PROJECT until it is killed, prints the child's pid, waits for the child and prints
"exit <pid> <signal or -code>". EOF or "quit" ends the server.

The child logs batches of BATCH examples with ids f"a{attempt}-{i}" (i = 0, 1, ...), calls
run.finalize() every FINALIZE_EVERY steps, and appends progress lines to
ROOT/progress-<attempt>.txt with unbuffered writes (they survive SIGKILL):
    s N   a step's end() returned; N rows logged so far
    f N   finalize() starts                F N   finalize() returned (N rows on disk)
    done  the step cap was reached (the child was never killed)
"""

import os
import sys

import torch
from torch import nn

import logix

MAX_STEPS = 5000  # a child nobody kills stops here


def log_until_killed(root: str, project: str, attempt: int, batch: int, shard_rows: int,
                     queue_size: int, finalize_every: int) -> None:
    torch.set_num_threads(1)
    progress = os.open(os.path.join(root, f"progress-{attempt}.txt"),
                       os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def note(line: str) -> None:
        os.write(progress, (line + "\n").encode())

    torch.manual_seed(0)  # every attempt logs the same model: reopening the log must accept it
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(attempt)
    run = logix.init(project, root_dir=root, rank=2, shard_rows=shard_rows,
                     queue_size=queue_size, num_workers=1)
    run.watch(model).add_lora().setup({"grad": ["log"]}).save(True)
    logged = 0
    for step in range(1, MAX_STEPS + 1):
        ids = [f"a{attempt}-{logged + i}" for i in range(batch)]
        with run(data_id=ids):
            model(torch.randn(batch, 4, generator=g)).pow(2).sum().backward()
        logged += batch
        note(f"s {logged}")
        if step % finalize_every == 0:
            note(f"f {logged}")
            run.finalize()
            run.save(True)  # a mid-run finalize: the steps after it are training rows too
            note(f"F {logged}")
    run.finalize()
    note("done")


def serve(argv) -> None:
    root, project = argv[0], argv[1]
    batch, shard_rows, queue_size, finalize_every = map(int, argv[2:6])
    print("ready", flush=True)
    for line in sys.stdin:
        line = line.strip()
        if line in ("", "quit"):
            break
        attempt = int(line)
        pid = os.fork()
        if pid == 0:  # the child: log, and never return into the server's loop
            code = 0
            try:
                log_until_killed(root, project, attempt, batch, shard_rows, queue_size,
                                 finalize_every)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        how = os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)
        print(f"exit {pid} {how}", flush=True)


if __name__ == "__main__":
    serve(sys.argv[1:])
