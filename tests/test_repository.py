"""The repository holds code and docs, never a run's output: no tracked file over 1 MiB, and the
examples' default output folders are ignored."""

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT = 1 << 20
EXAMPLE_OUTPUTS = ["logix_logs", "logix_lm", "logix_examples", "ui-demo", "examples/digits/out"]


def _git(*args):
    try:
        done = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("git is not installed")
    if done.returncode not in (0, 1) or "not a git repository" in done.stderr:
        pytest.skip(f"not a git checkout: {done.stderr.strip()}")
    return done.stdout


def test_no_tracked_file_over_one_mib():
    tracked = [line for line in _git("ls-files", "-z").split("\0") if line]
    assert tracked, "git ls-files listed nothing"
    too_big = []
    for path in tracked:
        full = os.path.join(ROOT, path)
        if os.path.isfile(full) and os.path.getsize(full) > LIMIT:
            too_big.append(f"{path} ({os.path.getsize(full) / LIMIT:.1f} MiB)")
    assert not too_big, ("run output or data committed; remove it and add its folder to "
                         f".gitignore: {too_big}")


@pytest.mark.parametrize("folder", EXAMPLE_OUTPUTS)
def test_example_output_folders_are_ignored(folder):
    probe = f"{folder}/project/logs/shard-r0-000000.safetensors"
    assert _git("check-ignore", "--no-index", probe).strip() == probe
