"""Docs stay true to the code: the API reference is regenerated from docstrings, and every
file the docs point at exists."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # imports every public module in a subprocess
def test_api_reference_is_current():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "gen_api.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_paths_named_in_docs_exist():
    missing = []
    for folder, _, files in os.walk(ROOT):
        if any(part.startswith(".") for part in folder[len(ROOT):].split(os.sep)):
            continue
        for name in files:
            if not name.endswith(".md"):
                continue
            text = open(os.path.join(folder, name)).read()
            for path in re.findall(r"`((?:examples|benchmarks|docs|scripts|logix|integrations)"
                                   r"/[\w./-]+\.(?:py|md|sh|yaml))`", text):
                if not os.path.exists(os.path.join(ROOT, path)):
                    missing.append(f"{name}: {path}")
    assert not missing, missing
