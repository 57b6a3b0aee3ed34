"""When one example dominates a layer's empirical Fisher, raw and ekfac queries say so: the share
max_n ||g_n||^2 / sum_n ||g_n||^2 per module, recorded while logging (raw) and when EK-FAC is
fitted (ekfac), equals the brute force over the logged rows."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import logix
from logix.influence import curvature
from logix.statistics.covariance import EKFAC_PEAK, GRAD_PEAK
from logix.storage.reader import LogReader


def logged_run(tmp_path, loud=None):
    """A tiny MLP logged with every statistic; example `loud`'s gradient scaled up 100x."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 6, generator=g), torch.randint(0, 4, (24,), generator=g)
    weight = torch.ones(len(x))
    if loud is not None:
        weight[loud] = 100.0
    run = logix.init("p", root_dir=str(tmp_path), rank=3)
    run.watch(model)
    run.add_lora()
    run.setup({"grad": ["log", "covariance"], "forward": ["covariance"],
               "backward": ["covariance"]})
    run.save(True)
    for start in range(0, len(x), 8):
        ids = list(range(start, start + 8))
        with run(data_id=ids):
            losses = F.cross_entropy(model(x[ids]), y[ids], reduction="none")
            (losses * weight[ids]).sum().backward()
    run.finalize()
    query = run.get_log(copy=True)
    return run, query


def brute_force_shares(run):
    _, rows = LogReader(run.project_dir).read_all()
    rows = rows.double()
    assert rows.shape[0] == 24
    shares = {}
    for m in LogReader(run.project_dir).manifest.modules:
        norms = rows[:, m.columns].square().sum(1)  # [n] ||g_n||^2
        shares[m.name] = float(norms.max() / norms.sum())
    return shares


def test_the_share_equals_the_brute_force_over_the_logged_rows(tmp_path):
    run, _ = logged_run(tmp_path, loud=5)
    expected = brute_force_shares(run)
    assert all(share > 0.9 for share in expected.values())
    attributor = logix.Attributor(run.project_dir)  # the saved statistics (EK-FAC fitted)
    for name in ("raw", "ekfac"):
        for module, share in expected.items():
            got = curvature.get(name).concentration(module, attributor.statistics)
            assert got == pytest.approx(share, rel=1e-5)
    assert attributor.statistics.has(GRAD_PEAK) and attributor.statistics.has(EKFAC_PEAK)


@pytest.mark.parametrize("hessian", ["raw", "ekfac"])
def test_raw_and_ekfac_queries_warn_and_record_the_share(tmp_path, hessian):
    run, query = logged_run(tmp_path, loud=5)
    expected = brute_force_shares(run)
    with pytest.warns(UserWarning, match="dominated by one example") as caught:
        result = run.compute_influence_all(query, hessian=hessian)
    message = str(next(w.message for w in caught if "dominated" in str(w.message)))
    assert all(repr(module) in message for module in expected)
    assert "hessian='kfac'" in message and "When one example dominates the Fisher" in message
    shares = result["meta"]["fisher_concentration"]
    assert shares.keys() == expected.keys()
    for module, share in expected.items():
        assert shares[module] == pytest.approx(share, rel=1e-5)


def test_auto_takes_kfac_when_one_example_dominates_ekfacs_fisher(tmp_path):
    """auto would pick ekfac; with one example carrying most of its Fisher it takes kfac, says
    why in meta, and does not warn (it took the advice); a normal log keeps ekfac."""
    run, query = logged_run(tmp_path / "loud", loud=5)
    expected = brute_force_shares(run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = run.compute_influence_all(query)
    assert result["meta"]["hessian"] == "kfac"
    assert result["meta"]["fisher_concentration"] == pytest.approx(expected, rel=1e-5)
    kfac = run.compute_influence_all(query, hessian="kfac")
    torch.testing.assert_close(result["influence"], kfac["influence"])
    quiet, quiet_query = logged_run(tmp_path / "quiet")
    assert quiet.compute_influence_all(quiet_query)["meta"]["hessian"] == "ekfac"


@pytest.mark.parametrize("hessian", ["kfac", "none"])
def test_other_kinds_do_not_warn(tmp_path, hessian):
    run, query = logged_run(tmp_path, loud=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = run.compute_influence_all(query, hessian=hessian)
    assert "fisher_concentration" not in result["meta"]


@pytest.mark.parametrize("hessian", ["raw", "ekfac"])
def test_a_normal_run_does_not_warn(tmp_path, hessian):
    run, query = logged_run(tmp_path)
    assert all(share < 0.5 for share in brute_force_shares(run).values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = run.compute_influence_all(query, hessian=hessian)
    assert "fisher_concentration" not in result["meta"]


def test_statistics_without_the_peaks_give_no_diagnostic(tmp_path):
    """Logs written before the diagnostic: no peak saved, no share, no warning."""
    run, query = logged_run(tmp_path, loud=5)
    attributor = logix.Attributor(run.project_dir)
    attributor.statistics.drop(GRAD_PEAK)
    attributor.statistics.drop(EKFAC_PEAK)
    for name in ("raw", "ekfac"):
        modules = [m.name for m in attributor.modules()]
        assert curvature.concentrated(name, attributor.statistics, modules) == {}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = attributor.influence(query, hessian=name)
        assert "fisher_concentration" not in result["meta"]
