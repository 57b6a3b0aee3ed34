"""The Hugging Face Trainer under torchrun and Lightning's DDP strategy, 2 CPU processes with
gloo: LogIX's callbacks log every example once, equal to a 1-process run."""

import os
import subprocess
import sys

import pytest
import torch

from logix.storage.manifest import Manifest
from logix.storage.reader import LogReader

pytest.importorskip("transformers")
pytest.importorskip("lightning")
pytestmark = pytest.mark.slow  # torchrun, 20-30 s each

WORKER = os.path.join(os.path.dirname(__file__), "workers", "ddp_integrations.py")


def run_worker(kind, root, processes):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [WORKER, kind, str(root), str(processes)]
    if kind == "hf" and processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={processes}"] + args
    else:  # Lightning's ddp strategy starts its own processes
        command = [sys.executable] + args
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600,
                          cwd=str(root))
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.parametrize("kind", ["hf", "lightning"])
def test_two_processes_log_like_one(tmp_path, kind):
    for processes in (1, 2):
        run_worker(kind, tmp_path, processes)
    logs = {}
    for processes in (1, 2):
        project = str(tmp_path / f"{kind}-{processes}")
        ids, rows = LogReader(project).read_all()
        assert sorted(ids) == list(range(16)), ids
        logs[processes] = dict(zip(ids, rows))
    assert {s.rank for s in Manifest.load(str(tmp_path / f"{kind}-2")).shards} == {0, 1}
    for i, row in logs[1].items():
        assert row.abs().sum() > 0
        torch.testing.assert_close(logs[2][i], row, rtol=1e-4, atol=1e-6)
