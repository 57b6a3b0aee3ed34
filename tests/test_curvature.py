"""The curvature registry: one table that configuration, the scheduler and queries all read."""

import pytest

from logix.config import InfluenceConfig, load_config
from logix.errors import ConfigError, UsageError
from logix.influence import curvature
from logix.statistics.covariance import BACKWARD, FORWARD, GRAD


def test_every_reader_of_curvature_kinds_sees_the_registry():
    assert curvature.names() == ("none", "raw", "kfac", "ekfac", "lissa")
    for name in ("auto",) + curvature.names():
        assert InfluenceConfig(hessian=name).hessian == name
    with pytest.raises(ConfigError, match="allowed"):
        load_config(None, influence={"hessian": "kfca"})
    with pytest.raises(UsageError, match="'kfac'"):
        curvature.get("kfca")


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
