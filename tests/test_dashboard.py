"""The dashboard without a browser: example content, evaluation result files, the JSON endpoints
of `logix ui` (numbers against the score matrix), bad input as messages, `logix report`."""

from __future__ import annotations

import base64
import json
import os
import struct
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest
import torch

from dashboard_fixtures import COMPLETION, N_TEST, N_TRAIN, TOKENS, WORDS, snapshot
import dashboard_fixtures

from logix.cli import main
from logix.dashboard import build_report
from logix.dashboard.plots import png_data_uri
from logix.errors import UsageError
from logix.evaluation import load_results
from logix.storage.content import load_content

root, server = dashboard_fixtures.root, dashboard_fixtures.server  # pytest fixtures


def get(url: str):
    """(status, parsed JSON or text) of a GET."""
    try:
        with urllib.request.urlopen(url) as r:
            status, body, kind = r.status, r.read(), r.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        status, body, kind = e.code, e.read(), e.headers["Content-Type"]
    return status, json.loads(body) if kind == "application/json" else body.decode()


def decode_png(uri: str) -> np.ndarray:
    """Grey 8-bit PNG (filter type 0, as png_data_uri writes) back to an array."""
    data = base64.b64decode(uri.split(",", 1)[1])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, width + 1)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:]


# --------------------------------------------------------------------------- example content
def test_describe_round_trip(root):
    store = load_content(root["run"].project_dir)
    assert len(store) == N_TRAIN + N_TEST
    entry = store.get(5)
    assert entry["text"] == "train example 5" and entry["label"] == 5 % 3
    expected = np.round(root["images"][5].numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(entry["image"], expected)
    assert store.get("q1") == {"text": "A dog", "label": "dog"}
    assert store.get("never-described") == {}


def test_describe_later_call_overrides_field_by_field(tmp_path):
    from logix.storage.content import describe

    describe(str(tmp_path), [1, 2], texts=["one", "two"], labels=[0, 1])
    describe(str(tmp_path), [2], labels=["second"])
    store = load_content(str(tmp_path))
    assert store.get(2) == {"text": "two", "label": "second"}
    assert sorted(os.listdir(tmp_path / "content")) == ["content-r0-000000.safetensors",
                                                        "content-r0-000001.safetensors"]


def test_describe_rejects_bad_input(tmp_path):
    from logix.storage.content import describe

    with pytest.raises(UsageError, match="2 ids but 1 texts"):
        describe(str(tmp_path), [1, 2], texts=["only one"])
    with pytest.raises(UsageError, match="images must be"):
        describe(str(tmp_path), [1], images=[np.zeros((2, 3, 4, 5))])
    with pytest.raises(UsageError, match="needs texts="):
        describe(str(tmp_path), [1])
    assert not os.path.exists(tmp_path / "content") or not os.listdir(tmp_path / "content")


def test_channels_first_rgb_image_is_stored_channels_last(tmp_path):
    from logix.storage.content import describe

    image = torch.zeros(3, 2, 5, dtype=torch.uint8)  # [C, H, W]
    image[0] = 255
    describe(str(tmp_path), ["a"], images=[image])
    stored = load_content(str(tmp_path)).get("a")["image"]
    assert stored.shape == (2, 5, 3)
    assert (stored[..., 0] == 255).all() and (stored[..., 1:] == 0).all()


def test_png_data_uri_decodes_to_the_pixels():
    image = (np.arange(35).reshape(5, 7) * 7).astype(np.uint8)
    np.testing.assert_array_equal(decode_png(png_data_uri(image)), image)


# --------------------------------------------------------------------------- evaluation files
def test_results_round_trip(root):
    lds = load_results(root["lds"])
    assert lds["kind"] == "lds" and lds["lds"] == 0.4
    assert lds["per_query"][0] == pytest.approx(0.2) and lds["per_query"][1] is None
    brittle = load_results(root["brittle"])
    assert brittle["results"][0]["k_flip"] == 4 and brittle["results"][0]["margins"]["4"] == -0.1


def test_results_refuse_other_files(tmp_path):
    from logix.evaluation import save_results

    path = tmp_path / "x.json"
    path.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="not a LogIX evaluation result file"):
        load_results(str(path))
    with pytest.raises(TypeError, match="save_results takes"):
        save_results(str(tmp_path / "y.json"), {"nope": 1})


# --------------------------------------------------------------------------- JSON endpoints
def test_projects_endpoint(server, root):
    status, data = get(server + "/api/projects")
    assert status == 200
    (row,) = data["projects"]
    manifest = root["run"].reader().manifest
    assert row["key"] == "demo" and row["rows"] == N_TRAIN == manifest.rows
    assert row["width"] == manifest.dim and row["modules"] == 2 and row["state"] == "finalized"
    assert row["shards"] == len(manifest.shards) and row["disk_bytes"] > 0


def test_project_endpoint(server, root):
    status, data = get(server + "/api/project/demo?hash=1")
    assert status == 200
    assert data["verify"] == {"ok": True, "errors": [], "warnings": [], "hashed": True}
    assert [m["name"] for m in data["summary"]["modules"]] == ["0", "2"]
    assert {f["file"] for f in data["score_files"]} == {"scores/test.safetensors",
                                                        "scores/tokens.safetensors",
                                                        "scores/broken.safetensors"}
    assert {f["file"] for f in data["evaluation_files"]} == {"evaluation/lds.json",
                                                             "evaluation/brittle.json"}
    assert data["content"]["described"] == N_TRAIN + N_TEST
    # spectra: eigenvalues of the stored covariance (sum / count), brute force
    from safetensors.torch import load_file

    stats = load_file(os.path.join(root["run"].project_dir, "state", "statistics.safetensors"))
    cov = stats["0::forward"].double() / stats["0::forward::count"].double()
    expected = torch.linalg.eigvalsh(cov).flip(0)
    got = torch.tensor(data["spectra"]["modules"]["0"]["forward"]["eigenvalues"],
                       dtype=torch.float64)
    torch.testing.assert_close(got, expected)
    assert data["growth"]["rows"][-1] == N_TRAIN


def test_scores_endpoint_matches_the_matrix(server, root):
    influence = root["result"]["influence"]
    tgt = root["result"]["tgt_ids"]
    for q in range(N_TEST):
        status, data = get(server + f"/api/scores/demo/scores/test.safetensors?query={q}&k=4")
        assert status == 200
        assert data["src_id"] == root["test_ids"][q]
        top = torch.topk(influence[q], 4)
        bottom = torch.topk(influence[q], 4, largest=False)
        assert [e["id"] for e in data["helpful"]] == [tgt[i] for i in top.indices.tolist()]
        assert [e["id"] for e in data["harmful"]] == [tgt[i] for i in bottom.indices.tolist()]
        assert [e["score"] for e in data["helpful"]] == pytest.approx(top.values.tolist())
        groups = root["result"]["groups"]
        first = data["helpful"][0]
        column = tgt.index(first["id"])
        assert first["groups"] == pytest.approx({g: float(groups[g][q, column]) for g in groups})
        assert first["content"]["text"] == f"train example {first['id']}"
        assert first["content"]["image"].startswith("data:image/png;base64,")
        assert data["src_content"]["label"] == ["cat", "dog", "hi"][q]
        assert data["tokens"] is None


def test_per_token_scores_endpoint(server, root):
    status, data = get(server + "/api/scores/demo/scores/tokens.safetensors?query=0&k=2")
    assert status == 200
    assert data["tokens"]["tokens"] == TOKENS[0]
    assert data["tokens"]["completion"] == COMPLETION[0]
    influence = root["result"]["influence"]
    for entry in data["helpful"] + data["harmful"]:
        row = data["tokens"]["rows"][json.dumps(entry["id"])]
        assert len(row) == len(TOKENS[0])
        assert sum(row) == pytest.approx(entry["score"], rel=1e-5)  # tokens sum to the query
        column = root["result"]["tgt_ids"].index(entry["id"])
        assert sum(row) == pytest.approx(float(influence[0, column]), rel=1e-5)


def _cells(html: str):
    """(class, background, title, text) of every word cell of a heat map, in page order."""
    import html as html_lib
    import re

    return [(c, bg, html_lib.unescape(t), html_lib.unescape(x)) for c, bg, t, x in re.findall(
        r'<span class="(tok[^"]*)" style="background:([^"]*)" title="([^"]*)">([^<]*)</span>',
        html)]


def test_heat_map_words_one_scale_legend_completion_and_text(server, root):
    """Issue item 3: words (subword tokens joined, per-token values on hover), prompt words
    marked, one colour scale per query with its legend, the training text on every row."""
    status, html = get(server + "/scores/demo/scores/tokens.safetensors?query=0&k=2")
    assert status == 200
    cells = _cells(html)
    assert len(cells) == 4 * len(WORDS[0])  # 2 helpful + 2 harmful rows
    assert [text for _, _, _, text in cells[:3]] == WORDS[0]
    assert [cls for cls, _, _, _ in cells[:3]] == ["tok prompt", "tok prompt", "tok"]
    word_title = cells[1][2]  # " password": its sum, then each token's score
    assert "' pass'" in word_title and "'w'" in word_title and "'ord'" in word_title
    total, parts = word_title.split(" = ")
    numbers = [float(p.rsplit(" ", 1)[1]) for p in parts.split(" + ")]
    assert float(total) == pytest.approx(sum(numbers), rel=1e-3)
    # one scale for the query: only the largest |word| of all rows reaches the full colour
    full = {"rgb(55,125,255)", "rgb(255,55,55)"}
    assert sum(bg in full for _, bg, _, _ in cells) == 1
    assert 'class="heat-legend"' in html and "helpful" in html and "harmful" in html
    data = get(server + "/api/scores/demo/scores/tokens.safetensors?query=0&k=2")[1]
    scale = max(abs(sum(r[1:4])) for r in data["tokens"]["rows"].values())
    assert f"helpful {scale:.3g}<" in html
    rows = html.split('<tbody>')[-1].split("</tr>")[:4]
    for row, entry in zip(rows, data["helpful"] + data["harmful"]):
        assert f"train example {entry['id']}</span>" in row  # the training text beside it
        assert f'href="/example/demo?id={entry["id"]}"' in row  # the id links to its page


def test_damaged_token_completion_is_a_message(root, tmp_path):
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from logix.dashboard.data import Dashboard

    project = str(tmp_path / "demo")
    shutil.copytree(root["run"].project_dir, project)
    path = os.path.join(project, "scores", "tokens.safetensors")
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = {**f.metadata(), "token_completion": "5"}
    save_file(tensors, path, metadata=metadata)
    data = Dashboard([project]).scores("demo", "scores/tokens.safetensors")
    assert "token_completion must be a JSON list" in data["tokens"]["error"]


def test_tokens_group_into_words():
    from logix.dashboard.words import group_words

    tokens = ["the", " pass", "w", "ord", " ", "r", "es", "et", "\n", "    ", "return",
              "\u0120x", "\u2581y", "z", "."]
    flags = [False] * 4 + [True] * 11
    words = group_words(tokens, [1.0, 2.0, 3.0, None] + [1.0] * 11, flags)
    assert [w["text"] for w in words] == ["the", " password", " reset", "\n", "    return",
                                          " x", " yz."]
    assert [w["completion"] for w in words] == [False, False, True, True, True, True, True]
    assert words[1]["score"] == 5.0  # a missing token score counts 0 in the word's sum
    assert words[1]["tokens"] == [(" pass", 2.0), ("w", 3.0), ("ord", None)]
    split = group_words([" pass", "word"], [1.0, 1.0], [False, True])  # prompt | completion
    assert [w["text"] for w in split] == [" pass", "word"]


def test_score_meta_is_summarised_with_details(root, tmp_path):
    """Issue item 4: 16 damping values and 32 projection shapes become one line each."""
    import shutil

    from logix.dashboard.data import Dashboard
    from logix.dashboard.pages import Links, scores_page
    from logix.storage.scores import save_scores

    project = str(tmp_path / "demo")
    shutil.copytree(root["run"].project_dir, project)
    damping = {f"layers.{n}.mlp": 1.2345678e-3 * (n + 1) for n in range(16)}
    shapes = {f"layers.{n}.proj": [16, 64] for n in range(32)}
    meta = {"damping": damping, "projection": {"init": "random", "seed": 0, "shapes": shapes},
            "mode": "dot", "lr": 0.000123456789}
    save_scores(os.path.join(project, "scores", "meta.safetensors"), root["result"], meta=meta)
    data = Dashboard([project]).scores("demo", "scores/meta.safetensors")
    html = scores_page([data], Links())
    head = html.split('<details class="meta-details">')[0]
    assert "<b>damping</b>: 16 values, 0.00123 to 0.0198</li>" in head
    assert "<b>projection</b>: init random, seed 0, shapes: 32 entries</li>" in head
    assert "<b>lr</b>: 0.0001235</li>" in head and "<b>mode</b>: dot</li>" in head
    assert "0.0012345678" not in head and "layers.3" not in head
    details = html.split('<details class="meta-details">')[1].split("</details>")[0]
    assert "0.0012345678" in details and "layers.31.proj" in details


def test_projection_is_summarised(server):
    status, html = get(server + "/project/demo")
    assert status == 200
    assert '<p id="projection-summary"><b>random</b>, rank 2, 2 modules, seed 0;' in html
    assert '<details id="projection-matrices"><summary>4 matrices</summary>' in html


def test_ticks_are_round():
    import re

    from logix.dashboard.plots import line_plot, nice_ticks

    assert nice_ticks(1, 325, integer=True) == [0, 100, 200, 300, 400]
    assert nice_ticks(1, 4, integer=True) == [1, 2, 3, 4]
    assert nice_ticks(-0.0123, 0.0456) == [-0.02, 0.0, 0.02, 0.04, 0.06]
    assert nice_ticks(0.5, 1.5) == [0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6]
    for lo, hi in ((0, 64.8), (1, 7), (-3.3, 0.01), (40, 40460)):
        ticks = nice_ticks(lo, hi)
        step = ticks[1] - ticks[0]
        assert ticks[0] <= lo and ticks[-1] >= hi and 3 <= len(ticks) <= 8
        mantissa = step / 10 ** __import__("math").floor(__import__("math").log10(step))
        assert round(mantissa, 6) in (1, 2, 5), (lo, hi, ticks)
    svg = line_plot([("x", range(1, 82), [float(v) for v in range(1, 82)])], xlabel="index",
                    x_integer=True)
    x_ticks = re.findall(r'y="199" text-anchor="middle" class="tick">([^<]*)<', svg)
    assert x_ticks == ["0", "20", "40", "60", "80", "100"]  # not 1, 21, 41, 60.5, 81


def test_spectra_index_axis_has_whole_ticks(server):
    import re

    html = get(server + "/project/demo")[1]
    spectra = html.split('id="spectra"')[1].split("<h2>")[0]
    ticks = re.findall(r'y="199" text-anchor="middle" class="tick">([^<]*)<', spectra)
    assert ticks and all(t.lstrip("-").isdigit() for t in ticks), ticks


# --------------------------------------------------------------------------- example page
def test_example_endpoint_ranks_queries_by_normalised_score(server, root):
    influence, tgt = root["result"]["influence"], root["result"]["tgt_ids"]
    example = tgt[5]
    column = tgt.index(example)
    status, data = get(server + f"/api/example/demo?id={example}&k=50")
    assert status == 200 and data["norm"] == "max"
    assert data["content"]["text"] == f"train example {example}"
    normalised = (influence[:, column] / influence.abs().max(1).values).tolist()
    expected = sorted((v for v in normalised if v > 0), reverse=True)
    files = {f["file"]: f["scored"] for f in data["files"]}
    assert files == {"scores/test.safetensors": True, "scores/tokens.safetensors": True}
    assert "broken.safetensors" in data["problems"][0]
    # both score files hold the same matrix: every query appears twice
    assert [e["score"] for e in data["helps"]] == pytest.approx(
        sorted(expected * 2, reverse=True), rel=1e-5)
    for entry in data["helps"] + data["hurts"]:
        q = entry["query"]
        assert entry["query_id"] == root["test_ids"][q]
        assert entry["raw"] == pytest.approx(float(influence[q, column]), rel=1e-5)
        assert entry["score"] == pytest.approx(normalised[q], rel=1e-5)
    assert all(e["score"] < 0 for e in data["hurts"])
    raw = get(server + f"/api/example/demo?id={example}&norm=raw&k=50")[1]
    positive = [float(v) for v in influence[:, column] if v > 0]
    assert [e["score"] for e in raw["helps"]] == pytest.approx(
        sorted(positive * 2, reverse=True), rel=1e-5)


def test_example_page_html(server, root):
    example = root["result"]["tgt_ids"][3]
    status, html = get(server + f"/example/demo?id={example}")
    assert status == 200
    assert "train example" in html and 'class="label-tag"' in html
    assert "divided by its query&#x27;s largest |score|" in html and "(norm=max)" in html
    assert f'href="/example/demo?id={example}&amp;norm=raw">raw</a>' in html
    assert 'href="/scores/demo/scores/test.safetensors?query=' in html  # queries link back
    assert 'id="train-tokens"' in html and "Not available" in html
    status, html = get(server + f"/example/demo?id={example}&norm=raw")
    assert "raw scores as stored" in html and "(norm=raw)" in html


def test_example_page_colours_query_words_where_files_have_them(server, root):
    example = root["result"]["tgt_ids"][3]
    data = get(server + f"/api/example/demo?id={example}&k=50")[1]
    with_tokens = [e for e in data["helps"] + data["hurts"] if e["tokens"]]
    assert {e["file"] for e in with_tokens} == {"scores/tokens.safetensors"}
    for entry in with_tokens:
        assert entry["tokens"]["tokens"] == TOKENS[entry["query"]]
        assert sum(entry["tokens"]["values"]) == pytest.approx(entry["raw"], rel=1e-5)
    html = get(server + f"/example/demo?id={example}&k=50")[1]
    assert 'class="heat-legend"' in html
    words = [text for _, _, _, text in _cells(html)]
    assert " password" in words and "w" not in words


def test_example_ids_are_json(server):
    status, data = get(server + "/api/example/demo?id=%22q1%22")  # a described query id
    assert status == 200 and data["id"] == "q1" and data["content"]["text"] == "A dog"
    assert not any(f["scored"] for f in data["files"]) and data["helps"] == []
    assert get(server + "/api/example/demo?id=q1")[1]["id"] == "q1"  # typed by hand
    assert get(server + "/api/example/demo?id=%225%22")[0] == 404  # "5" is not 5


@pytest.mark.parametrize("path, status, message", [
    ("/api/example/demo", 400, "needs ?id="),
    ("/api/example/demo?id=5&norm=z", 400, "norm='z' is not known"),
    ("/api/example/demo?id=12345", 404, "No training example 12345"),
    ("/api/example/nope?id=1", 404, "No project 'nope'"),
])
def test_example_bad_requests(server, path, status, message):
    got, data = get(server + path)
    assert got == status and message in data["error"]


def test_evaluation_endpoint(server):
    status, data = get(server + "/api/evaluation/demo/evaluation/lds.json")
    assert status == 200 and data["kind"] == "lds" and data["lds"] == 0.4


@pytest.mark.parametrize("path, status, message", [
    ("/api/project/nope", 404, "No project 'nope'"),
    ("/api/scores/demo/scores/broken.safetensors", 422, "not a readable safetensors file"),
    ("/api/scores/demo/scores/test.safetensors?query=99", 400, "out of range"),
    ("/api/scores/demo/scores/test.safetensors?k=abc", 400, "not a whole number"),
    ("/api/scores/demo/scores/test.safetensors?group=bogus", 400, "no scores of group 'bogus'"),
    ("/api/scores/demo/../../etc/passwd", 404, "No score file"),
    ("/api/evaluation/demo/manifest.json", 404, "No evaluation result file"),
    ("/api/whatever", 404, "No page"),
])
def test_bad_requests_are_messages(server, path, status, message):
    got, data = get(server + path)
    assert got == status and message in data["error"]


def test_bad_pages_are_html_messages_without_traceback(server):
    status, html = get(server + "/scores/demo/scores/broken.safetensors")
    assert status == 422 and 'class="error"' in html and "not a readable" in html
    assert "Traceback" not in html


def test_server_only_reads(server, root):
    before = snapshot(root["root"])
    for path in ("/", "/project/demo?hash=1", "/scores/demo/scores/test.safetensors?query=1",
                 "/scores/demo/scores/tokens.safetensors", "/evaluation/demo/evaluation/lds.json",
                 "/evaluation/demo/evaluation/brittle.json", "/api/projects",
                 "/example/demo?id=3", "/example/demo?id=3&norm=raw"):
        assert get(server + path)[0] == 200
    request = urllib.request.Request(server + "/api/projects", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request)
    assert e.value.code == 405
    assert snapshot(root["root"]) == before


def test_folder_that_is_not_a_log(root):
    from logix.dashboard.data import Dashboard

    board = Dashboard([os.path.join(root["root"], "notes")])
    data = board.projects()
    assert data["projects"] == []
    assert "is not a LogIX log" in data["problems"][0]


def test_log_being_written_and_corrupt_manifest(tmp_path):
    from logix.dashboard.data import Dashboard

    (tmp_path / "started" / "logs").mkdir(parents=True)  # a run before its first manifest
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{ not json")
    rows = {r["key"]: r for r in Dashboard([str(tmp_path)]).projects()["projects"]}
    assert "no manifest.json yet" in rows["started"]["error"]
    assert "corrupt" in rows["bad"]["error"]


# --------------------------------------------------------------------------- report, CLI
def test_report_is_self_contained(root, tmp_path):
    out = build_report([root["root"]], str(tmp_path / "report.html"), max_queries=2, k=3)
    html = open(out, encoding="utf-8").read()
    for anchor in ('id="projects"', 'id="project-demo"', 'id="scores-demo-scores_test_safetensors"',
                   'id="evaluation-demo-evaluation_lds_json"'):
        assert anchor in html
    assert html.count('class="query-view"') >= 2 + 2  # two score files, two queries each
    assert "not a readable safetensors file" in html  # the broken file is a message
    bare = html.replace('xmlns="http://www.w3.org/2000/svg"', "")  # a namespace, not fetched
    assert "http://" not in bare and "https://" not in bare
    assert "<link" not in html and "<script src" not in html


def test_cli_report_and_top_with_content(root, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", root["root"], "-o", str(out), "--queries", "1"]) == 0
    assert out.stat().st_size > 0 and "wrote" in capsys.readouterr().out
    assert main(["top", root["scores"], "--k", "2", "--query", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)[0]
    assert result["text"] == "A dog" and result["label"] == "dog"
    assert result["helpful"][0]["text"] == f"train example {result['helpful'][0]['id']}"
    assert main(["top", root["scores"], "--k", "2", "--query", "1"]) == 0
    assert "A dog" in capsys.readouterr().out
    assert main(["ui", str(tmp_path / "missing")]) == 2
