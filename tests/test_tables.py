"""Printed tables keep module names whole in an 80-column pipe: run.summary(), the resource plan
and `logix show`; run.summary() prints once (under print() too)."""

from __future__ import annotations

import torch
from torch import nn

from logix.cli import main

LONG = "encoder_block_with_a_really_quite_long_module_name"


def _long_named_model() -> nn.Module:
    torch.manual_seed(0)
    inner = nn.Sequential()
    inner.add_module(LONG, nn.Linear(6, 5))
    inner.add_module("head", nn.Linear(5, 3))
    return nn.Sequential(inner)


def _watched(new_run):
    run = new_run()
    model = _long_named_model()
    run.watch(model).add_lora(rank=2)
    run.setup({"grad": ["log"]})
    return run, model


def test_summary_prints_once_with_whole_names(new_run, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    run, _ = _watched(new_run)
    assert run.summary() is None
    printed = capsys.readouterr().out
    assert printed.count("LogIX project") == 1 and f"0.{LONG}" in printed
    assert "row width" in printed  # the last column is not cut off
    text = run.summary(show=False)
    assert capsys.readouterr().out == "" and text == printed


def test_plan_table_keeps_whole_names(new_run):
    run, _ = _watched(new_run)
    plan = run.resource_plan(examples=10, show=False).render()
    assert f"0.{LONG} " in plan and "total (2 modules)" in plan


def test_logix_show_keeps_names_on_one_line(new_run, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    run, model = _watched(new_run)
    run.save(True)
    with run(data_id=[0, 1]):
        model(torch.randn(2, 6)).sum().backward()
    run.finalize()
    capsys.readouterr()
    assert main(["show", run.project_dir]) == 0
    assert f"0.{LONG}" in capsys.readouterr().out
