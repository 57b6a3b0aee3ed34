"""Tests for the `logix` command line (logix/cli/) and score files (logix/storage/scores.py).

Every log here is written by the public API on a tiny model, then inspected, damaged and checked.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

import logix
from logix.cli import main
from logix.errors import LogFormatError
from logix.storage.scores import load_scores, open_scores, save_scores

IN, HIDDEN, OUT, RANK = 6, 5, 3, 2
STEPS, BATCH, SHARD_ROWS = 3, 3, 4  # 9 rows -> shards of 4, 4, 1


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))


def _log(root, project="demo", setup=None, ids_from=0, steps=STEPS, **overrides):
    """Write a small log through the public API; returns (run, model, project folder)."""
    model = _model()
    run = logix.init(project, root_dir=str(root), shard_rows=SHARD_ROWS, lora={"rank": RANK},
                     **overrides)
    run.watch(model)
    run.add_lora()
    run.setup(setup or {"grad": ["log"]})
    run.save(True)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(BATCH, IN, generator=generator)
        y = torch.randint(0, OUT, (BATCH,), generator=generator)
        ids = [f"ex{ids_from + step * BATCH + i}" for i in range(BATCH)]
        with run(data_id=ids):
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    run.finalize()
    return run, model, os.path.join(str(root), project)


@pytest.fixture
def log_dir(tmp_path):
    _, _, project_dir = _log(tmp_path)
    manifest = json.load(open(os.path.join(project_dir, "manifest.json")))
    assert manifest["rows"] == STEPS * BATCH and len(manifest["shards"]) == 3  # non-empty log
    return project_dir


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out, captured.err


def _shard(project_dir, seq):
    return os.path.join(project_dir, "logs", f"shard-r0-{seq:06d}.safetensors")


def _edit_manifest(project_dir, edit):
    path = os.path.join(project_dir, "manifest.json")
    data = json.load(open(path))
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


# --------------------------------------------------------------------------- show
def test_show_json_matches_the_log_on_disk(log_dir, capsys):
    code, out, _ = cli(capsys, "show", log_dir, "--json", "--shards")
    assert code == 0
    info = json.loads(out)
    assert info["project"] == "demo" and info["format_version"] == 2
    assert info["dtype"] == "float32"
    assert [m["name"] for m in info["modules"]] == ["0", "2"]
    assert [m["gradient"] for m in info["modules"]] == [[HIDDEN, IN], [OUT, HIDDEN]]
    assert [m["rank"] for m in info["modules"]] == [[RANK, RANK], [RANK, RANK]]
    assert [m["offset"] for m in info["modules"]] == [0, RANK * RANK]
    assert info["row_width"] == 2 * RANK * RANK
    assert info["rows"] == STEPS * BATCH
    assert info["shards"]["count"] == 3
    on_disk = sum(os.path.getsize(_shard(log_dir, s)) for s in range(3))
    assert info["shards"]["bytes"] == on_disk
    assert [f["rows"] for f in info["shards"]["files"]] == [4, 4, 1]
    full = HIDDEN * IN + OUT * HIDDEN
    assert info["full_gradient_numbers"] == full
    assert info["bytes_per_example"] == 2 * RANK * RANK * 4
    assert info["compression"] == pytest.approx(full / (2 * RANK * RANK))
    assert info["projection"]["init"] == "random" and info["projection"]["seed"] == 0
    assert info["statistics"]["present"] and info["statistics"]["entries"] == {}


def test_show_text_lists_modules_and_shards_only_on_request(log_dir, capsys):
    code, out, _ = cli(capsys, "show", log_dir)
    assert code == 0
    for text in ("demo", "float32", "Linear", f"{HIDDEN} x {IN}", f"{OUT} x {HIDDEN}",
                 "init random, seed 0", "3 (", "none collected"):
        assert text in out, text
    assert "shard-r0-000002" not in out
    ratio = (HIDDEN * IN + OUT * HIDDEN) / (2 * RANK * RANK)
    assert f"{ratio:.1f}x smaller" in out
    code, out, _ = cli(capsys, "show", log_dir, "--shards")
    assert code == 0 and "logs/shard-r0-000002.safetensors" in out


def test_show_reports_statistics_kinds_and_counts(tmp_path, capsys):
    _, _, project_dir = _log(tmp_path, setup={"grad": ["log", "covariance"],
                                              "forward": ["covariance"],
                                              "backward": ["covariance"]})
    code, out, _ = cli(capsys, "show", project_dir, "--json")
    assert code == 0
    entries = json.loads(out)["statistics"]["entries"]
    assert set(entries) == {"0", "2"}
    for module in ("0", "2"):
        assert {"forward", "backward", "grad"} <= set(entries[module])
        assert entries[module]["forward"]["shape"] == [RANK, RANK]
        assert entries[module]["grad"]["shape"] == [RANK * RANK, RANK * RANK]
        assert entries[module]["grad"]["count"] == STEPS * BATCH
    code, out, _ = cli(capsys, "show", project_dir)
    assert code == 0 and "backward" in out and "forward" in out
    assert cli(capsys, "verify", project_dir)[0] == 0


def test_show_accepts_the_manifest_path_and_bfloat16_logs(tmp_path, capsys):
    _, _, project_dir = _log(tmp_path, log_dtype="bfloat16")
    code, out, _ = cli(capsys, "show", os.path.join(project_dir, "manifest.json"), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["dtype"] == "bfloat16" and info["bytes_per_example"] == 2 * RANK * RANK * 2
    assert cli(capsys, "verify", project_dir)[0] == 0


# --------------------------------------------------------------------------- verify
def test_verify_passes_an_intact_log(log_dir, capsys):
    code, out, _ = cli(capsys, "verify", log_dir, "-v")
    assert code == 0
    assert "OK: 3 shards (9 rows)" in out and "0 errors, 0 warnings" in out
    assert out.count("ok    logs/shard-r0-") == 3


def test_verify_names_a_shard_with_flipped_bytes(log_dir, capsys):
    path = _shard(log_dir, 1)
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0xFF  # inside the grad data: the header still parses
    open(path, "wb").write(bytes(data))
    code, out, _ = cli(capsys, "verify", log_dir)
    assert code == 1
    errors = [line for line in out.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1
    assert "shard-r0-000001" in errors[0] and "xxh3" in errors[0]
    assert "FAILED" in out


def test_verify_reports_a_truncated_shard_even_without_hashing(log_dir, capsys):
    path = _shard(log_dir, 0)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    for extra in ([], ["--no-hash"]):
        code, out, _ = cli(capsys, "verify", log_dir, *extra)
        assert code == 1
        assert "shard-r0-000000" in out and "truncated" in out
        assert "shard-r0-000001" not in out


def test_verify_reports_a_missing_shard(log_dir, capsys):
    os.remove(_shard(log_dir, 2))
    code, out, _ = cli(capsys, "verify", log_dir)
    assert code == 1
    assert "'logs/shard-r0-000002.safetensors' is named in the manifest but missing" in out


def test_verify_checks_width_against_the_manifest_not_only_the_hash(log_dir, capsys):
    """A shard rewritten with a wrong width but a matching manifest entry: the structure check
    (not the checksum) must catch it."""
    path = _shard(log_dir, 0)
    with safe_open(path, framework="pt") as f:
        ids = f.metadata()["data_ids"]
        grad = f.get_tensor("grad")
    data = safetensors_bytes({"grad": grad[:, :-1].contiguous()}, metadata={"data_ids": ids})
    open(path, "wb").write(data)
    import hashlib

    def fix(manifest):
        manifest["shards"][0].update(bytes=len(data),
                                     checksum="sha256:" + hashlib.sha256(data).hexdigest())

    _edit_manifest(log_dir, fix)
    code, out, _ = cli(capsys, "verify", log_dir)
    assert code == 1
    assert f"is {2 * RANK * RANK - 1} columns wide" in out and "shard-r0-000000" in out


def test_verify_reports_a_dtype_that_differs_from_the_manifest(log_dir, capsys):
    _edit_manifest(log_dir, lambda m: m.update(dtype="float16"))
    code, out, _ = cli(capsys, "verify", log_dir)
    assert code == 1
    assert out.count("'grad' is F32, the manifest says float16") == 3


def test_verify_warns_about_stray_and_temporary_files(log_dir, capsys):
    logs = os.path.join(log_dir, "logs")
    open(os.path.join(logs, "shard-r0-000007.safetensors.tmp"), "wb").write(b"partial")
    with open(_shard(log_dir, 0), "rb") as src:
        open(os.path.join(logs, "shard-r0-000008.safetensors"), "wb").write(src.read())
    code, out, _ = cli(capsys, "verify", log_dir)
    assert code == 0
    assert "WARN" in out and "shard-r0-000007.safetensors.tmp" in out
    assert "'logs/shard-r0-000008.safetensors' is in logs/ but not named" in out
    assert "2 warnings" in out
    assert cli(capsys, "verify", log_dir, "--strict")[0] == 1


def test_verify_warns_about_ids_logged_twice(tmp_path, capsys):
    _log(tmp_path)
    _, _, project_dir = _log(tmp_path, steps=1, on_duplicate="allow")  # ex0..ex2 again
    manifest = json.load(open(os.path.join(project_dir, "manifest.json")))
    assert manifest["rows"] == (STEPS + 1) * BATCH  # appended, not replaced
    code, out, _ = cli(capsys, "verify", project_dir)
    assert code == 0
    assert "3 data ids appear more than once" in out and '"ex0"' in out


def test_verify_fails_without_projections(log_dir, capsys):
    os.remove(os.path.join(log_dir, "state", "projections.safetensors"))
    code, out, _ = cli(capsys, "verify", log_dir)
    assert code == 1 and "projections.safetensors is missing" in out


def test_verify_catches_a_manifest_that_does_not_add_up(log_dir, capsys):
    _edit_manifest(log_dir, lambda m: m.update(rows=10))
    code, out, _ = cli(capsys, "verify", log_dir)
    assert code == 1 and "manifest 'rows' is 10 but its shards hold 9 rows" in out


# --------------------------------------------------------------------------- bad paths
def test_missing_path_is_a_usage_error(tmp_path, capsys):
    for command in ("show", "verify"):
        code, out, err = cli(capsys, command, tmp_path / "nowhere")
        assert code == 2 and "does not exist" in err and out == ""


def test_folder_without_manifest_is_not_a_log(log_dir, tmp_path, capsys):
    code, _, err = cli(capsys, "show", tmp_path)  # the root_dir, not the project folder
    assert code == 2
    assert "is not a LogIX log: it has no manifest.json" in err
    assert os.path.join(str(tmp_path), "demo") in err  # names the project inside it
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = cli(capsys, "verify", empty)
    assert code == 2 and "not a LogIX log" in err


def test_newer_format_version_is_refused_with_a_clear_message(log_dir, capsys):
    _edit_manifest(log_dir, lambda m: m.update(format_version=99))
    code, _, err = cli(capsys, "show", log_dir)
    assert code == 1 and "format version 99" in err and "Upgrade LogIX" in err
    code, out, _ = cli(capsys, "verify", log_dir)
    assert code == 1 and "format version 99" in out


@pytest.mark.parametrize("content", [b'{"format": "logix", "format_ver', b"[1, 2]",
                                     b"\xff\xfe\x00garbage", b'{"format": "logix"}'])
def test_corrupt_manifest_is_reported_without_a_traceback(log_dir, capsys, content):
    open(os.path.join(log_dir, "manifest.json"), "wb").write(content)
    code, _, err = cli(capsys, "show", log_dir)
    assert code == 1 and "manifest.json" in err and err.startswith("logix: error:")
    code, out, _ = cli(capsys, "verify", log_dir)
    assert code == 1 and "no shard was checked" in out


def test_malformed_manifest_fields_are_reported(log_dir, capsys):
    _edit_manifest(log_dir, lambda m: m["shards"][0].update(rows="4"))
    code, _, err = cli(capsys, "show", log_dir)
    assert code == 1 and "rows is '4', expected int" in err


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["show"]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["top", "x.safetensors", "--k", "0"]) == 2
    assert main(["top", "x.safetensors", "--query", "-1"]) == 2
    assert main(["--help"]) == 0
    assert "usage: logix" in capsys.readouterr().out


# --------------------------------------------------------------------------- scores and top
def _scores_file(tmp_path, influence, src=None, tgt=None):
    n_test, n_train = influence.shape
    path = str(tmp_path / "scores.safetensors")
    save_scores(path, {"influence": influence, "src_ids": src or [f"q{i}" for i in range(n_test)],
                       "tgt_ids": tgt or [f"t{j}" for j in range(n_train)]}, meta={"mode": "dot"})
    return path


def test_scores_round_trip_and_validation(tmp_path):
    influence = torch.randn(3, 7)
    path = _scores_file(tmp_path, influence, tgt=list(range(7)))
    loaded = load_scores(path)
    assert torch.equal(loaded["influence"], influence)
    assert loaded["src_ids"] == ["q0", "q1", "q2"] and loaded["tgt_ids"] == list(range(7))
    assert loaded["meta"] == {"mode": "dot"}
    assert torch.equal(open_scores(path).row(2), influence[2])
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    with safe_open(path, framework="pt") as f:  # the documented layout, read without LogIX
        assert f.metadata()["format"] == "logix-scores"
        assert json.loads(f.metadata()["tgt_ids"]) == list(range(7))
    with pytest.raises(LogFormatError, match="does not match"):
        save_scores(path, {"influence": influence, "src_ids": ["a"], "tgt_ids": list(range(7))})
    newer = safetensors_bytes({"influence": influence}, metadata={
        "format": "logix-scores", "format_version": "2", "src_ids": "[]", "tgt_ids": "[]"})
    (tmp_path / "newer.safetensors").write_bytes(newer)
    with pytest.raises(LogFormatError, match="Upgrade LogIX"):
        load_scores(str(tmp_path / "newer.safetensors"))


def test_top_prints_largest_and_smallest_per_query(tmp_path, capsys):
    influence = torch.tensor([[0.5, -2.0, 3.0, 1.0, -0.1],
                              [-1.0, 4.0, 0.0, -3.0, 2.0]])
    path = _scores_file(tmp_path, influence)
    code, out, _ = cli(capsys, "top", path, "--k", "2", "--json")
    assert code == 0
    result = json.loads(out)
    assert [r["src_id"] for r in result] == ["q0", "q1"]
    assert [e["id"] for e in result[0]["helpful"]] == ["t2", "t3"]
    assert [e["id"] for e in result[0]["harmful"]] == ["t1", "t4"]
    assert [e["id"] for e in result[1]["helpful"]] == ["t1", "t4"]
    assert [e["id"] for e in result[1]["harmful"]] == ["t3", "t0"]
    assert result[1]["helpful"][0]["score"] == 4.0

    code, out, _ = cli(capsys, "top", path, "--k", "1", "--query", "1")
    assert code == 0
    assert "query 1: q1" in out and "query 0" not in out
    assert "t1" in out and "t3" in out and "t2" not in out
    assert "Positive = helpful" in out


def test_top_ignores_nonfinite_scores_and_clips_k(tmp_path, capsys):
    influence = torch.tensor([[float("nan"), 1.0, -1.0]])
    path = _scores_file(tmp_path, influence)
    code, out, _ = cli(capsys, "top", path, "--k", "10", "--json")
    assert code == 0
    (result,) = json.loads(out)
    assert [e["id"] for e in result["helpful"]] == ["t1", "t2"]
    assert result["nonfinite"] == 1
    assert all(math.isfinite(e["score"]) for e in result["harmful"])


def test_top_errors(tmp_path, log_dir, capsys):
    path = _scores_file(tmp_path, torch.randn(2, 3))
    code, _, err = cli(capsys, "top", path, "--query", "2")
    assert code == 2 and "out of range" in err and "2 queries" in err
    code, _, err = cli(capsys, "top", tmp_path / "none.safetensors")
    assert code == 2 and "does not exist" in err
    code, _, err = cli(capsys, "top", _shard(log_dir, 0))  # a shard is not a score file
    assert code == 2 and "no 'influence' tensor" in err
    code, _, err = cli(capsys, "ui", str(tmp_path), "--port", "-5")
    assert code == 2 and "a port is 0-65535" in err
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    code, _, err = cli(capsys, "top", tmp_path / "junk.safetensors")
    assert code == 1 and "not a readable safetensors file" in err


def test_top_on_scores_of_a_real_log(tmp_path, capsys):
    run, model, _ = _log(tmp_path)
    run.eval()
    x, y = torch.randn(2, IN), torch.tensor([0, 2])
    with run(data_id=["qa", "qb"]):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    result = run.compute_influence_all()
    assert result["influence"].shape == (2, STEPS * BATCH)
    path = save_scores(str(tmp_path / "s.safetensors"), result)
    code, out, _ = cli(capsys, "top", path, "--k", "3", "--json")
    assert code == 0
    top = json.loads(out)
    for q in range(2):
        row = result["influence"][q]
        assert top[q]["src_id"] == result["src_ids"][q]
        assert top[q]["helpful"][0]["id"] == result["tgt_ids"][int(row.argmax())]
        assert top[q]["harmful"][0]["id"] == result["tgt_ids"][int(row.argmin())]
        assert top[q]["helpful"][0]["score"] == pytest.approx(float(row.max()))


# --------------------------------------------------------------------------- installed entry point
@pytest.mark.slow  # a fresh interpreter per command
def test_installed_entry_point(log_dir, tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "logix")
    if not os.path.exists(exe):
        exe = "/work/venv/bin/logix"
    if not os.path.exists(exe):
        pytest.skip("the `logix` console script is not installed")
    ok = subprocess.run([exe, "verify", log_dir], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "OK: 3 shards (9 rows)" in ok.stdout
    missing = subprocess.run([exe, "show", str(tmp_path / "nowhere")], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    os.remove(_shard(log_dir, 1))
    bad = subprocess.run([exe, "verify", log_dir], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "shard-r0-000001" in bad.stdout


def test_top_reads_what_compute_influence_all_writes_with_out(tmp_path, capsys):
    """The engine's streamed score file and save_scores share one format (docs/format.md)."""
    run, model, _ = _log(tmp_path)
    run.eval()
    with run(data_id=["qa", "qb"]):
        model.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(2, IN)), torch.tensor([1, 0]),
                                    reduction="sum").backward()
    in_memory = run.compute_influence_all(progress=False, influence_groups="module")
    path = str(tmp_path / "streamed.safetensors")
    run.compute_influence_all(progress=False, influence_groups="module", out=path)
    loaded = load_scores(path)
    assert loaded["src_ids"] == ["qa", "qb"] and loaded["tgt_ids"] == in_memory["tgt_ids"]
    torch.testing.assert_close(loaded["influence"], in_memory["influence"])
    assert set(loaded["groups"]) == set(in_memory["groups"]) and loaded["groups"]
    code, out, _ = cli(capsys, "top", path, "--k", "1", "--json")
    assert code == 0
    row = in_memory["influence"][1]
    assert json.loads(out)[1]["helpful"][0]["id"] == in_memory["tgt_ids"][int(row.argmax())]
    group = sorted(loaded["groups"])[0]
    code, out, _ = cli(capsys, "top", path, "--k", "1", "--group", group, "--json")
    assert code == 0
    row = in_memory["groups"][group][0]
    assert json.loads(out)[0]["harmful"][0]["id"] == in_memory["tgt_ids"][int(row.argmin())]


def test_save_scores_keeps_groups_and_top_picks_one(tmp_path, capsys):
    total = torch.tensor([[1.0, 2.0, 3.0]])
    path = str(tmp_path / "g.safetensors")
    save_scores(path, {"influence": total, "src_ids": ["q"], "tgt_ids": ["a", "b", "c"],
                       "groups": {"fc1": torch.tensor([[3.0, 0.0, 0.0]]),
                                  "fc2": total - torch.tensor([[3.0, 0.0, 0.0]])}})
    assert set(load_scores(path)["groups"]) == {"fc1", "fc2"}
    code, out, _ = cli(capsys, "top", path, "--k", "1")
    assert code == 0 and "Groups in the file: fc1, fc2" in out
    code, out, _ = cli(capsys, "top", path, "--k", "1", "--group", "fc1", "--json")
    assert code == 0 and json.loads(out)[0]["helpful"][0]["id"] == "a"
    code, _, err = cli(capsys, "top", path, "--group", "nope")
    assert code == 2 and "fc1" in err  # a usage error: no such group


def test_verify_is_a_storage_function_whose_report_the_cli_prints(log_dir):
    from logix.storage.verify import verify

    report = verify(log_dir)
    assert report.ok and report.shards == 3 and len(report.ok_shards) == 3
    assert report.bytes_read == sum(os.path.getsize(os.path.join(log_dir, f))
                                    for f in report.ok_shards)
    shard = os.path.join(log_dir, report.ok_shards[1])
    with open(shard, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff\xff\xff\xff")
    damaged = verify(log_dir)
    assert not damaged.ok and len(damaged.ok_shards) == 2
    assert any("xxh3" in e and report.ok_shards[1] in e for e in damaged.errors)
    assert verify(log_dir, hashing=False).ok  # size and header are intact
