"""The dashboard in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`,
installed by scripts/setup.sh) driven by selenium clicks through every page and checks the
rendered DOM against the score matrix; screenshots must not be blank."""

from __future__ import annotations

import os
import shutil
import struct
import time
import zlib

import pytest
import torch
from torch.nn import functional as F

from dashboard_fixtures import N_TRAIN, WORDS, X_ATTR, X_JSON, X_MODULE, X_SCRIPT, X_URL
import dashboard_fixtures


_MISSING = [name for name, binary in (("chromium", "chromium"),
                                      ("chromium-driver", "chromedriver"))
            if shutil.which(binary) is None]
pytestmark = pytest.mark.skipif(
    bool(_MISSING), reason=f"Debian package(s) {', '.join(_MISSING)} missing: "
                           "bash scripts/setup.sh installs them (as root), or apt-get install "
                           "chromium chromium-driver")
webdriver = pytest.importorskip("selenium.webdriver",
                                reason="selenium missing: pip install -e '.[test]'")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

root, server, hostile = (dashboard_fixtures.root, dashboard_fixtures.server,
                         dashboard_fixtures.hostile)  # pytest fixtures

_WAIT = 60  # seconds a page may take on a loaded machine (a ceiling, not a measurement)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(shutil.which("chromedriver")))
    driver.set_page_load_timeout(_WAIT)
    yield driver
    driver.quit()


def wait_for(driver, condition):
    return WebDriverWait(driver, _WAIT).until(condition)


def text(driver, selector: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, selector).text


def assert_not_blank(driver, path: str) -> None:
    """Save a screenshot; its pixels must take many values (a blank page takes one)."""
    assert driver.save_screenshot(path)
    data = open(path, "rb").read()
    pos, idat = 8, b""
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    assert len(set(zlib.decompress(idat))) > 20, f"{path} looks blank"


def test_click_through_every_page(browser, server, root, tmp_path):
    influence, tgt = root["result"]["influence"], root["result"]["tgt_ids"]
    browser.get(server + "/")
    row = browser.find_element(By.CSS_SELECTOR, 'tr[data-key="demo"]')
    assert row.find_element(By.CSS_SELECTOR, 'td[data-field="rows"]').text == str(N_TRAIN)
    assert_not_blank(browser, str(tmp_path / "projects.png"))

    row.find_element(By.LINK_TEXT, "demo").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "verify-status"))
    assert text(browser, "#verify-status").startswith("OK")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#modules tbody tr")) == 2
    assert len(browser.find_elements(By.CSS_SELECTOR, "#spectra svg polyline")) >= 2
    assert_not_blank(browser, str(tmp_path / "project.png"))

    browser.find_element(By.LINK_TEXT, "scores/test.safetensors").click()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".query-id"))
    assert text(browser, ".query-id") == "q0"
    assert "cat" in text(browser, ".query-content")
    best = int(torch.argmax(influence[0]))
    assert text(browser, "table.helpful tbody tr:first-child td.id") == str(tgt[best])
    shown = float(text(browser, "table.helpful tbody tr:first-child td.score"))
    assert shown == pytest.approx(float(influence[0, best]), rel=1e-5)
    worst = int(torch.argmin(influence[0]))
    assert text(browser, "table.harmful tbody tr:first-child td.id") == str(tgt[worst])
    loaded = browser.execute_script(
        "return [...document.querySelectorAll('img.example')].every(i => i.naturalWidth > 0)")
    assert loaded and browser.find_elements(By.CSS_SELECTOR, "img.example")
    assert_not_blank(browser, str(tmp_path / "scores.png"))

    Select(browser.find_element(By.CSS_SELECTOR, "select.query-select")).select_by_value("2")
    wait_for(browser, lambda d: text(d, ".query-id") == "q2")
    best = int(torch.argmax(influence[2]))
    assert text(browser, "table.helpful tbody tr:first-child td.id") == str(tgt[best])

    browser.find_element(By.LINK_TEXT, "demo").click()
    wait_for(browser, lambda d: d.find_elements(By.LINK_TEXT, "evaluation/lds.json"))
    browser.find_element(By.LINK_TEXT, "evaluation/lds.json").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "lds-value"))
    assert text(browser, "#lds-value") == "0.4000"
    assert browser.find_elements(By.CSS_SELECTOR, "figure.plot svg rect")
    assert_not_blank(browser, str(tmp_path / "evaluation.png"))


def test_per_token_heat_map(browser, server, root, tmp_path):
    browser.get(server + "/scores/demo/scores/tokens.safetensors?query=0&k=2")
    rows = browser.find_elements(By.CSS_SELECTOR, "table.tokens tbody tr")
    assert len(rows) == 4  # 2 helpful + 2 harmful
    words = rows[0].find_elements(By.CSS_SELECTOR, "span.tok")
    assert [w.text for w in words] == WORDS[0]  # subwords joined, spaces kept
    colours = {w.value_of_css_property("background-color") for w in words}
    assert len(colours) == len(WORDS[0])  # word scores 1 : 2+3+4 : 5 of the query's
    styles = [w.value_of_css_property("font-style") for w in words]
    assert styles == ["italic", "italic", "normal"]  # prompt words, then the completion
    assert "'w'" in words[1].get_attribute("title")  # the tokens' scores on hover
    legend = browser.find_element(By.CSS_SELECTOR, "svg.heat-legend")
    assert legend.is_displayed() and legend.size["width"] > 100
    first_id = rows[0].find_element(By.CSS_SELECTOR, "td.id").text
    assert f"train example {first_id}" in rows[0].find_element(By.CSS_SELECTOR,
                                                                  ".train-text").text
    assert_not_blank(browser, str(tmp_path / "heat.png"))


def test_example_page(browser, server, root, tmp_path):
    """From a score page's training id to its page; the normalised and raw views."""
    influence, tgt = root["result"]["influence"], root["result"]["tgt_ids"]
    browser.get(server + "/scores/demo/scores/test.safetensors?query=1&k=3")
    link = browser.find_element(By.CSS_SELECTOR, "table.helpful tbody tr:first-child a"
                                                 ".example-link")
    example = int(link.text)
    link.click()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".example-id"))
    assert text(browser, ".example-id") == str(example)
    assert f"train example {example}" in text(browser, ".query-content")
    assert "(norm=max)" in text(browser, "#norm-note")
    column = tgt.index(example)
    normalised = influence[:, column] / influence.abs().max(1).values
    best = float(normalised.max())
    assert float(text(browser, "table.helps tbody tr:first-child td.score")) == \
        pytest.approx(best, rel=1e-3)
    assert "Not available" in text(browser, "#train-tokens")
    assert_not_blank(browser, str(tmp_path / "example.png"))
    browser.find_element(By.LINK_TEXT, "raw").click()
    wait_for(browser, lambda d: "(norm=raw)" in text(d, "#norm-note"))
    assert float(text(browser, "table.helps tbody tr:first-child td.score")) == \
        pytest.approx(float(influence[:, column].max()), rel=1e-3)
    browser.find_element(By.CSS_SELECTOR, "table.helps tbody tr:first-child td.id a").click()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".query-id"))
    assert text(browser, ".query-id") == root["test_ids"][int(influence[:, column].argmax())]


def test_broken_score_file_is_a_message(browser, server):
    browser.get(server + "/scores/demo/scores/broken.safetensors")
    assert "not a readable safetensors file" in text(browser, ".error")
    assert "Traceback" not in browser.page_source


def test_projects_page_updates_while_logging(browser, server, root):
    browser.get(server + "/")
    cell = 'tr[data-key="demo"] td[data-field="rows"]'
    assert text(browser, cell) == str(N_TRAIN)
    import logix
    from conftest import make_mlp

    model = make_mlp(in_dim=6, hidden=5, out_dim=3, seed=0)
    run = logix.init("demo", root_dir=root["root"])  # reopen: new shards append
    run.watch(model)
    run.add_lora(rank=2)
    run.setup({"grad": ["log", "covariance"], "forward": ["covariance"],
               "backward": ["covariance"]})  # what the log's earlier session collected
    run.save(True)
    with run(data_id=[f"extra{i}" for i in range(4)]):
        model.zero_grad()
        F.cross_entropy(model(torch.randn(4, 6)), torch.zeros(4, dtype=torch.long),
                        reduction="sum").backward()
    run.flush()  # a shard on disk and in the rank index, no finalize: a run still logging
    wait_for(browser, lambda d: text(d, cell) == str(N_TRAIN + 4))
    assert text(browser, 'tr[data-key="demo"] td[data-field="state"]') == "logging"
    run.finalize()


def test_static_report_offline(browser, root, tmp_path):
    from logix.dashboard import build_report

    out = build_report([root["root"]], str(tmp_path / "report.html"), max_queries=3, k=3)
    browser.get("file://" + os.path.abspath(out))
    section = browser.find_element(By.ID, "scores-demo-scores_test_safetensors")
    views = section.find_elements(By.CSS_SELECTOR, ".query-view")
    assert [v.is_displayed() for v in views] == [True, False, False]
    Select(section.find_element(By.CSS_SELECTOR, "select.query-select")).select_by_value("1")
    assert [v.is_displayed() for v in views] == [False, True, False]
    assert "q1" in views[1].find_element(By.CSS_SELECTOR, ".query-id").text
    browser.find_element(By.CSS_SELECTOR, '#project-demo a.score-link').click()
    assert "#scores-demo-scores_" in browser.current_url  # in-file anchors, no server
    assert_not_blank(browser, str(tmp_path / "report.png"))


def assert_nothing_ran(driver, where: str) -> str:
    """No injected script or handler ran, no injected element exists; the page's text."""
    time.sleep(0.2)  # let image error handlers fire
    assert driver.execute_script("return typeof window.__xss") == "undefined", where
    assert not driver.find_elements(By.CSS_SELECTOR, 'img[src="x"], a[href^="javascript:"]'), where
    return driver.find_element(By.TAG_NAME, "body").text


def test_hostile_fields_are_text_not_code(browser, hostile, tmp_path):
    """Every field read from disk holds markup or script (file and folder names, module names,
    ids, texts, labels, tokens, meta, result fields): no script runs in the live pages or the
    report, and the hostile strings are visible as text."""
    from logix.dashboard import build_report

    shown = ""
    for path in dashboard_fixtures.hostile_paths(hostile["key"]):
        browser.get(hostile["server"] + path)
        shown += assert_nothing_ran(browser, path)
    scores = hostile["server"] + dashboard_fixtures.hostile_paths(hostile["key"])[2]
    browser.get(scores)
    Select(browser.find_element(By.CSS_SELECTOR, "select.query-select")).select_by_value("1")
    wait_for(browser, lambda d: "q_" in text(d, ".query-id"))
    shown += assert_nothing_ran(browser, "query picker")
    out = build_report([hostile["root"]], str(tmp_path / "report.html"), max_queries=2, k=6)
    browser.get("file://" + os.path.abspath(out))
    shown += assert_nothing_ran(browser, "report")
    for select in browser.find_elements(By.CSS_SELECTOR, "select.query-select"):
        Select(select).select_by_value("1")
    shown += assert_nothing_ran(browser, "report, second queries")
    for value in (X_SCRIPT, X_ATTR, X_MODULE, X_URL, X_JSON, "img_\\udcff.png", "q_\\udcfe"):
        assert value in shown, value


def test_training_example_token_heat_map(browser, tmp_path):
    """A tiny GPT-2's training example coloured by its tokens' shares of its score for a query
    (logix.text.train_token_scores, saved with the scores): the words show, their scores sum to
    the pair's score, and a token holding markup is text."""
    from conftest import make_tiny_gpt2

    import logix
    from dashboard_fixtures import serving
    from logix.storage.scores import save_scores
    from logix.text import attach_train_tokens, query_log, train_token_scores

    model = make_tiny_gpt2()
    run = logix.init("lm", root_dir=str(tmp_path / "root"))
    run.watch(model, name_filter=["attn", "mlp"]).add_lora(rank=4)
    run.setup({"grad": ["log"]})
    run.save(True)
    train = torch.randint(1, 50, (4, 8), generator=torch.Generator().manual_seed(2))
    with run(data_id=[0, 1, 2, 3]):
        logits = model(train).logits
        F.cross_entropy(logits[:, :-1].transpose(1, 2), train[:, 1:], reduction="sum").backward()
    run.finalize()
    run.eval()
    log = query_log(run, model, [[1, 2]], [[3, 4, 5]], data_ids=["q0"])
    result = run.compute_influence_all(log, progress=False)
    pair = train_token_scores(run, model, log, train[1], data_id=1)
    pair["token_text"][2] = X_SCRIPT
    save_scores(os.path.join(run.project_dir, "scores", "pairs.safetensors"),
                attach_train_tokens(result, [pair]))
    with serving([str(tmp_path / "root")]) as base:
        browser.get(base + "/example/lm?id=1")
        wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#train-tokens"))
        assert_nothing_ran(browser, "training tokens")
        rows = browser.find_elements(By.CSS_SELECTOR, "#train-tokens table.tokens tbody tr")
        assert len(rows) == 1 and rows[0].find_element(By.CSS_SELECTOR, "td.id").text == "q0"
        words = rows[0].find_elements(By.CSS_SELECTOR, "span.tok, span.prompt")
        assert X_SCRIPT in rows[0].text and len(words) >= 2
        shown = sum(float(w.get_attribute("title").split(" = ")[0]) for w in words)
        rounding = 1e-3 * sum(abs(v) for v in pair["token_scores"])  # titles keep 4 digits
        assert shown == pytest.approx(pair["score"], abs=rounding)
        assert float(rows[0].find_element(By.CSS_SELECTOR, "td.num").text) == \
            pytest.approx(pair["score"], rel=1e-3)
        assert_not_blank(browser, str(tmp_path / "train_tokens.png"))
