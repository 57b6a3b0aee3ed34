"""Statistics describe exactly the rows in the log (docs/concepts.md, "Statistics and the log"):
an example whose row is not written (a duplicate id skipped, a refused step) adds nothing to the
forward, backward or gradient covariances; a later session that appends rows merges its
statistics with the saved ones; a folder whose manifest is gone is not appended to."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

import logix
from conftest import make_mlp, seeded
from logix.errors import LogFormatError, UsageError
from logix.storage.reader import LogReader
from test_statistics import ALL_STATS, check_mlp_statistics

T = 4  # tokens per example


def data(n, seed):
    g = seeded(seed)
    x, y = torch.randn(n, T, 6, generator=g), torch.randn(n, T, 3, generator=g)
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    return x, y, mask


def log_steps(run, model, x, y, mask, batches, logged):
    """Log each batch of ids; returns the (x, y, mask) of the examples whose rows were new."""
    kept = []
    for ids in batches:
        with run(data_id=ids, mask=mask[ids]):
            (((model(x[ids]) - y[ids]) ** 2).sum(-1) * mask[ids]).sum().backward()
        new = [i for i in ids if i not in logged]
        logged.update(new)
        if new:
            kept.append((x[new], y[new], mask[new]))
    return kept


def logging_run(new_run, project, model, setup=ALL_STATS):
    run = new_run(project, shard_rows=5)
    run.watch(model).add_lora(rank=3)
    return run.setup({**setup, "grad": ["log"] + setup.get("grad", [])}).save(True)


def test_skipped_duplicates_add_nothing_to_the_statistics(new_run, tmp_root):
    """Three passes over 12 ids, the later ones in batches that mix logged and new ids: 12 rows,
    and every covariance (forward counts real tokens) equals brute force over those 12 rows."""
    model = make_mlp(seed=40)
    x, y, mask = data(12, seed=40)
    passes = [[[0, 1, 2], [3, 4, 5]],
              [[4, 6, 0], [7, 8, 1], [9, 10, 11], [2, 3, 5]],
              [[11, 0, 5], [1, 2, 3], [4, 6, 7], [8, 9, 10]]]
    run = logging_run(new_run, "epochs", model)
    kept, logged = [], set()
    for batches in passes:
        with pytest.warns(UserWarning, match="Skipped") if logged else contextlib.nullcontext():
            kept += log_steps(run, model, x, y, mask, batches, logged)
    run.finalize()
    assert LogReader(os.path.join(tmp_root, "epochs")).rows == 12
    assert run.statistics.counts[("0", "grad")] == 12
    assert run.statistics.counts[("0", "backward")] == 12
    assert run.statistics.counts[("0", "forward")] == float(mask.sum())
    check_mlp_statistics(run, model, kept, include_bias=False, use_mask=True)
    saved = new_run("epochs").watch(model).initialize_from_log()
    check_mlp_statistics(saved, model, kept, include_bias=False, use_mask=True)
    assert saved.statistics.counts[("0", "ekfac")] == 12


def test_rows_logged_after_a_query_keep_their_statistics(new_run, tmp_root):
    """finalize, eval() and a query, then save(True) and more rows: the statistics (and EK-FAC)
    describe all the rows, as when they are logged in one go (eval's query plan used to stay,
    so the appended rows added no statistics)."""
    model = make_mlp(seed=43)
    x, y, mask = data(10, seed=43)
    batches = [[0, 1, 2], [3, 4], [5, 6, 7], [8, 9]]
    one_go = logging_run(new_run, "one-go", model)
    log_steps(one_go, model, x, y, mask, batches, set())
    one_go.finalize()
    run = logging_run(new_run, "after-query", model)
    kept = log_steps(run, model, x, y, mask, batches[:2], set())
    run.finalize()
    run.eval()
    with run(data_id=["q"], mask=mask[:1]):
        (((model(x[:1]) - y[:1]) ** 2).sum(-1) * mask[:1]).sum().backward()
    run.save(True)
    kept += log_steps(run, model, x, y, mask, batches[2:], set())
    run.finalize()
    assert LogReader(os.path.join(tmp_root, "after-query")).rows == 10
    assert run.statistics.counts[("0", "backward")] == 10
    check_mlp_statistics(run, model, kept, include_bias=False, use_mask=True)
    for key, total in one_go.statistics.sums.items():
        torch.testing.assert_close(run.statistics.sums[key], total, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reload", [False, True], ids=["reopen", "initialize_from_log"])
def test_a_second_session_merges_its_statistics_with_the_saved_ones(new_run, tmp_root, reload):
    """Without initialize_from_log the saved statistics used to be replaced by the second
    session's; with it, its skipped duplicates were counted. Both now describe all rows."""
    model = make_mlp(seed=41)
    x, y, mask = data(10, seed=41)
    logged = set()
    first = logging_run(new_run, "two", model)
    kept = log_steps(first, model, x, y, mask, [[0, 1, 2], [3, 4]], logged)
    first.finalize()
    second = logging_run(new_run, "two", model)
    if reload:
        second.initialize_from_log()
    with pytest.warns(UserWarning, match="Skipped 1 rows"):
        kept += log_steps(second, model, x, y, mask, [[3, 5, 6], [4, 7, 8, 9]], logged)
    second.finalize()
    assert LogReader(os.path.join(tmp_root, "two")).rows == 10
    saved = new_run("two").watch(model).initialize_from_log()
    assert saved.statistics.counts[("2", "grad")] == 10
    check_mlp_statistics(saved, model, kept, include_bias=False, use_mask=True)
    assert saved.statistics.counts[("2", "ekfac")] == 10  # refitted over every row


def test_a_mean_loss_with_scale_gives_the_statistics_of_the_summed_loss(new_run):
    """scale= makes a mean loss's rows those of the summed loss; the output-gradient (backward)
    covariance takes scale squared with them, so K-FAC matches the summed loss too (it used to
    stay unscaled: K-FAC scores off by scale^2)."""
    model = make_mlp(seed=45)
    x, y, mask = data(6, seed=45)
    batches = [[0, 1, 2], [3, 4, 5]]
    summed = logging_run(new_run, "summed", model)
    log_steps(summed, model, x, y, mask, batches, set())
    mean = logging_run(new_run, "mean", model)
    for ids in batches:
        tokens = float(mask[ids].sum())
        with mean(data_id=ids, mask=mask[ids], scale=tokens):
            loss = (((model(x[ids]) - y[ids]) ** 2).sum(-1) * mask[ids]).sum()
            (loss / tokens).backward()
    for run in (summed, mean):
        run.finalize()
    assert set(mean.statistics.sums) == set(summed.statistics.sums)
    for key, total in summed.statistics.sums.items():
        torch.testing.assert_close(mean.statistics.sums[key], total, rtol=1e-4, atol=1e-6)
        assert mean.statistics.counts[key] == summed.statistics.counts[key]


def test_a_log_whose_session_never_finalized_names_the_lost_statistics(new_run):
    """Rows of a session that crashed before finalize() have no saved statistics: a new session
    collecting covariances is refused, saying so (it used to blame the earlier setup)."""
    model = make_mlp(seed=44)
    x, y, mask = data(6, seed=44)
    crashed = logging_run(new_run, "crashed", model)
    log_steps(crashed, model, x, y, mask, [[0, 1, 2], [3, 4, 5]], set())
    crashed.flush()  # shards on disk, no finalize()
    with pytest.warns(UserWarning, match="already holds a log of 6 rows"):
        again = logging_run(new_run, "crashed", model)
        with pytest.raises(UsageError, match=r"no saved statistics: the session that logged them "
                                             r"ended before run.finalize\(\)"):
            log_steps(again, model, x, y, mask, [[0, 1, 2]], set())


def test_a_second_session_with_other_statistics_is_refused(new_run, tmp_root):
    model = make_mlp(seed=42)
    x, y, mask = data(6, seed=42)
    first = logging_run(new_run, "kinds", model)
    log_steps(first, model, x, y, mask, [[0, 1, 2]], set())
    first.finalize()
    second = logging_run(new_run, "kinds", model, setup={})
    with pytest.raises(UsageError, match=r"already holds 3 rows whose saved statistics are "
                                         r"\['backward', 'forward', 'grad'\].*collects none"):
        log_steps(second, model, x, y, mask, [[3, 4, 5]], set())
    second.finalize()
    assert LogReader(os.path.join(tmp_root, "kinds")).rows == 3
    saved = new_run("kinds").watch(model).initialize_from_log()
    assert saved.statistics.counts[("0", "grad")] == 3


def test_shards_without_a_manifest_are_not_appended_to(new_run, tmp_root):
    """manifest.json deleted, the next run has another rank: its rows would be of another width
    beside the old shards (and the old index file would list them in the new manifest)."""
    model = make_mlp(seed=43)
    x, y, mask = data(6, seed=43)
    first = logging_run(new_run, "orphans", model)
    log_steps(first, model, x, y, mask, [[0, 1, 2]], set())
    first.finalize()
    project_dir = os.path.join(tmp_root, "orphans")
    os.remove(os.path.join(project_dir, "manifest.json"))
    before = sorted(os.listdir(os.path.join(project_dir, "logs")))
    second = new_run("orphans", shard_rows=5)
    second.watch(model).add_lora(rank=2).setup({"grad": ["log"]}).save(True)
    with pytest.raises(LogFormatError, match=r"holds 1 shards \(rows of width \[18\]; this "
                                             r"run's rows have width 8\).*no manifest.json"):
        log_steps(second, model, x, y, mask, [[3, 4, 5]], set())
    assert sorted(os.listdir(os.path.join(project_dir, "logs"))) == before


def test_initialize_from_log_leaves_the_callers_config_alone(tmp_root):
    model = make_mlp(seed=44)
    run = logix.init("bf16", root_dir=tmp_root, log_dtype="bfloat16")
    run.watch(model).setup({"grad": ["log"]}).save(True)
    with run(data_id=[0, 1]):
        model(torch.randn(2, 6)).sum().backward()
    run.finalize()
    config = logix.load_config(None, root_dir=tmp_root)
    reopened = logix.init("bf16", config=config).watch(model).initialize_from_log()
    assert reopened.config.logging.log_dtype == "bfloat16"
    assert config.logging.log_dtype == "float32"

