"""The shipped config.yaml documents the defaults: loading it must equal loading nothing."""

import os

import pytest

import logix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_config_yaml_equals_defaults():
    assert logix.load_config(os.path.join(ROOT, "config.yaml")) == logix.load_config()


def test_readme_commands_exist():
    readme = open(os.path.join(ROOT, "README.md")).read()
    for command in ("bash scripts/demo.sh", "bash scripts/test.sh"):
        assert command in readme
        assert os.path.isfile(os.path.join(ROOT, command.split()[1]))
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "scripts/test.sh" in ci and "scripts/demo.sh" in ci


def test_the_default_root_cannot_shadow_the_package_and_a_logix_root_is_warned(tmp_path,
                                                                                monkeypatch):
    """A ./logix folder in the working directory would be imported instead of an editable
    install of LogIX, so the default root is ./logix_logs and ./logix is warned about."""
    from logix.config import Config

    assert os.path.basename(os.path.normpath(Config().root_dir)) != "logix"
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="named like the package"):
        logix.init("p", root_dir="./logix")
