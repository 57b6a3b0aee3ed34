"""benchmarks/gpu_suite.sh and gpu_suite.py on a machine without a GPU: the shell script parses
and skips cleanly, the arguments parse, the GPT-2-124M shapes are the real ones, and every part
of the suite runs end to end at a toy size on CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_suite.sh")
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import gpu_suite  # noqa: E402


def test_shell_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the suite itself")
def test_shell_script_skips_without_cuda(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(["bash", SCRIPT, str(out)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=sys.executable), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "skipped" in done.stdout
    assert not out.exists()


def test_arguments_and_their_checks():
    args = gpu_suite.parse_args([])
    assert (args.size, args.rank, args.device, args.parts) == (
        "gpt2-124m", 64, "cuda", ["train", "influence", "writer"])
    with pytest.raises(SystemExit):
        gpu_suite.parse_args(["--parts", "train,bogus"])


def test_gpt2_124m_has_gpt2_small_shapes():
    pytest.importorskip("transformers")
    with torch.device("meta"):
        model = gpu_suite.build_model("gpt2-124m", 1024, "meta", dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    assert 124_000_000 < params < 125_000_000, params  # GPT-2 small, tied embeddings
    assert next(model.parameters()).dtype == torch.bfloat16


def test_every_part_runs_at_a_toy_size_on_cpu(tmp_path):
    pytest.importorskip("transformers")
    result = gpu_suite.main([
        "--device", "cpu", "--size", "tiny", "--seq", "16", "--batch", "2", "--steps", "2",
        "--rounds", "1", "--rank", "4", "--train-rows", "2048", "--queries", "4",
        "--writer-rows", "64", "--writer-dim", "256", "--root", str(tmp_path),
        "--json", str(tmp_path / "out.json")])
    train, influence, writer = result["train"], result["influence"], result["writer"]
    assert train["plain_tokens_per_s"] > 0 and train["logged_tokens_per_s"] > 0
    assert train["row_dim"] == 2 * 4 * 4 * 4  # 2 blocks x 4 Conv1D layers x rank 4 x rank 4
    assert influence["full_pairs_per_s"] > 0 and influence["matmul_pairs_per_s"] > 0
    assert writer["append_GBps"] > 0 and writer["pinned"] is False
    assert (tmp_path / "out.json").is_file()
