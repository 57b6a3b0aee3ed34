"""The curvature registry: one table that configuration, the scheduler and queries all read."""

import pathlib
import re

import pytest

from logix.config import InfluenceConfig, load_config
from logix.errors import ConfigError, UsageError
from logix.influence import curvature
from logix.influence.attributor import check_config
from logix.statistics.covariance import BACKWARD, FORWARD, GRAD


def test_every_reader_of_curvature_kinds_sees_the_registry():
    assert curvature.names() == ("none", "raw", "kfac", "ekfac", "lissa", "full", "optimizer",
                                 "hessian", "ggn")
    for name in ("auto",) + curvature.names():
        assert check_config(InfluenceConfig(hessian=name)).hessian == name
    with pytest.raises(UsageError, match="'kfac'"):
        curvature.get("kfca")


def _option_choices(command: str, option: str):
    from logix import cli

    sub = next(a for a in cli._parser()._actions if a.dest == "command")
    actions = sub.choices[command]._actions
    return list(next(a for a in actions if option in a.option_strings).choices)


def test_cli_config_and_integrations_list_exactly_the_registry():
    kinds = list(curvature.names())
    assert _option_choices("plan", "--hessian") == kinds
    assert _option_choices("index", "--hessian") == ["auto", *kinds]
    assert _option_choices("search", "--hessian") == ["auto", *kinds]
    with pytest.raises(ConfigError) as refused:
        check_config(InfluenceConfig(hessian="kfca"))
    assert str(["auto", *kinds]) in str(refused.value)

    from logix.integrations._arguments import BaseLogIXArguments
    for name in kinds:
        assert BaseLogIXArguments(hessian=name).hessian == name
    with pytest.raises(ConfigError) as refused:
        BaseLogIXArguments(hessian="kfca")
    assert str(kinds) in str(refused.value)
    help_text = BaseLogIXArguments.__dataclass_fields__["hessian"].metadata["help"]
    assert re.findall(r"'(\w+)'", help_text) == kinds

    root = pathlib.Path(__file__).resolve().parent.parent
    comment = re.search(r"^  hessian: \w+ +# (.*)$", (root / "config.yaml").read_text(), re.M)
    assert comment.group(1).split(" | ") == ["auto", *kinds]


def test_a_misspelt_hessian_is_refused_where_the_config_is_read(tmp_path):
    """config.py sits below the registry: the Run and the Attributor check what they read."""
    import logix

    with pytest.raises(ConfigError, match="allowed values"):
        logix.init("typo", root_dir=str(tmp_path), influence={"hessian": "kfca"})
    cfg = load_config(None, root_dir=str(tmp_path))
    run = logix.init("fine", cfg)
    with pytest.raises(ConfigError, match="'kfca'"):
        logix.Attributor(run.project_dir, load_config(None, influence={"hessian": "kfca"}),
                         statistics=run.statistics)


def test_finalize_fits_the_kinds_fitted_from_rows():
    assert curvature.fitted_after_logging({FORWARD, BACKWARD}) == ["ekfac"]
    assert curvature.fitted_after_logging({GRAD}) == []


def test_kinds_declare_what_logging_must_collect():
    assert curvature.get("none").setup_spec() == {}
    assert curvature.get("raw").setup_spec() == {GRAD: ["covariance"]}
    assert curvature.get("kfac").setup_spec() == {FORWARD: ["covariance"],
                                                  BACKWARD: ["covariance"]}
    assert curvature.get("ekfac").needs_rows and not curvature.get("kfac").needs_rows
    assert curvature.get("lissa").setup_spec() == {} and curvature.get("lissa").needs_rows


def test_a_kind_without_a_spectrum_is_refused_at_definition():
    with pytest.raises(TypeError, match="spectrum"):
        class Broken(curvature.Curvature, name="broken"):
            covariances = (GRAD,)
    assert "broken" not in curvature.names()
