"""An editable install is a plain path entry: a clone folder named `logix`, with a script run
from its parent folder, still imports the installed package (a meta-path finder would come after
the path finder, which takes the clone folder for a namespace package)."""

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ["pyproject.toml", "README.md", "logix", "integrations"]


@pytest.mark.slow
def test_editable_install_of_a_clone_named_logix(tmp_path):
    clone = tmp_path / "logix"
    clone.mkdir()
    for name in SOURCES:
        source = os.path.join(ROOT, name)
        if os.path.isdir(source):
            shutil.copytree(source, clone / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "_version.py"))
        else:
            shutil.copy(source, clone / name)
    prefix = tmp_path / "prefix"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--ignore-installed",  # else pip uninstalls this environment's own logix first
         "--prefix", str(prefix), "-e", str(clone)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    site = sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)})
    pth = [name for name in os.listdir(site) if name.endswith(".pth")]
    assert pth, os.listdir(site)
    # -S: this environment's own editable install of the repository must not serve the import.
    script = (f"import sys, site; sys.path.append({sysconfig.get_path('purelib')!r}); "
              f"site.addsitedir({site!r}); import logix, logix.integrations.huggingface as hf; "
              "print(logix.__file__); print(hf.__file__); print(logix.init.__name__)")
    done = subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    package, integration, init = done.stdout.split()
    assert package == str(clone / "logix" / "__init__.py")
    assert integration == str(clone / "logix" / "integrations" / "huggingface.py")
    assert init == "init"
