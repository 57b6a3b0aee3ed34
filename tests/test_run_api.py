"""The Run facade: configuration errors, watch filters, setup, the start/end protocol and its
errors, the context manager, data ids, the module-level shortcuts and a light `import logix`."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import logix
from conftest import make_conv_model, make_embedding_model, make_mlp, seeded
from logix.errors import ConfigError, UsageError
from logix.storage.data_ids import normalize_data_ids


def tracked_names(run):
    return [e.name for e in run.layout()]


def one_step(run, model, x, ids=None, **kwargs):
    with run(data_id=list(range(len(x))) if ids is None else ids, **kwargs):
        model(x).pow(2).sum().backward()
    return run.get_log()


# --------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("overrides, key", [
    (dict(foo=1), "foo"),
    (dict(lora={"rnk": 3}), "lora.rnk"),
    (dict(logging={"flush": 3}), "logging.flush"),
], ids=["top-level", "lora-section", "logging-section"])
def test_unknown_config_key_is_named(tmp_root, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        logix.init("p", root_dir=tmp_root, **overrides)


@pytest.mark.parametrize("overrides, key", [
    (dict(rank="big"), "lora.rank"),
    (dict(include_bias="yes"), "logging.include_bias"),
    (dict(seed=1.5), "seed"),
    (dict(influence={"damping": "lots"}), "influence.damping"),
], ids=["int", "bool", "seed", "optional-float"])
def test_wrong_config_type_is_named(tmp_root, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        logix.init("p", root_dir=tmp_root, **overrides)


@pytest.mark.parametrize("overrides, key, value", [
    (dict(lora={"init": "xavier"}), "lora.init", "xavier"),
    (dict(log_dtype="int8"), "logging.log_dtype", "int8"),
    (dict(mode="manhattan"), "influence.mode", "manhattan"),
], ids=["init", "dtype", "mode"])
def test_bad_literal_is_named_with_allowed_values(tmp_root, overrides, key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        logix.init("p", root_dir=tmp_root, **overrides)
    assert value in str(err.value) and "allowed" in str(err.value)


def test_yaml_config_errors_name_the_key(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("lora:\n  rank: 8\n  rank_inn: 2\n")
    with pytest.raises(ConfigError, match=r"lora\.rank_inn"):
        logix.load_config(str(path))
    path.write_text("logging:\n  shard_rows: -3\n")
    with pytest.raises(ConfigError, match="shard_rows"):
        logix.load_config(str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        logix.load_config(str(tmp_path / "missing.yaml"))
    path.write_text("lora:\n  rank: 8\nlogging:\n  log_dtype: bf16\n")
    cfg = logix.load_config(str(path), seed=3)
    assert (cfg.lora.rank, cfg.logging.log_dtype, cfg.seed) == (8, "bfloat16", 3)


def test_section_override_merges_with_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("lora:\n  init: pca\n  rank: 8\n")
    cfg = logix.load_config(str(path), lora={"rank": 4})  # merges into the file's section
    assert (cfg.lora.init, cfg.lora.rank) == ("pca", 4)


def test_a_dict_config_is_read_like_the_yaml_file(tmp_root):
    given = {"lora": {"rank": 8}, "logging": {"log_dtype": "bf16"}}
    run = logix.init("p", config=given, root_dir=tmp_root, seed=3)
    cfg = run.config
    assert (cfg.lora.rank, cfg.logging.log_dtype, cfg.seed, cfg.root_dir) == \
        (8, "bfloat16", 3, tmp_root)
    assert given == {"lora": {"rank": 8}, "logging": {"log_dtype": "bf16"}}  # not modified
    merged = logix.load_config({"lora": {"init": "pca", "rank": 8}}, lora={"rank": 4})
    assert (merged.lora.init, merged.lora.rank) == ("pca", 4)
    damped = {"influence": {"damping": 0.01}}
    assert logix.load_config(damped, damping=None).influence.damping == 0.01  # not given
    assert logix.load_config(damped, influence={"damping": None}).influence.damping is None
    with pytest.raises(ConfigError, match=r"lora\.rank_inn"):
        logix.load_config({"lora": {"rank_inn": 2}})
    with pytest.raises(ConfigError, match="YAML file's path, a dict"):
        logix.init("p", config=8)


def test_bad_project_name(tmp_root):
    with pytest.raises(ConfigError, match="project"):
        logix.init("a/b", root_dir=tmp_root)
    with pytest.raises(ConfigError, match="project"):
        logix.init("", root_dir=tmp_root)


# --------------------------------------------------------------------------- watch
class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.encoder = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, ids):
        h = self.encoder(self.embed(ids))  # [B, T, 4]
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h).sum(1)


def test_watch_filters(new_run):
    seeded(0)
    model = Mixed()
    assert tracked_names(new_run().watch(model)) == ["embed", "encoder.0", "encoder.2", "conv",
                                                      "head"]
    assert tracked_names(new_run().watch(model, name_filter=["encoder"])) == \
        ["encoder.0", "encoder.2"]
    assert tracked_names(new_run().watch(model, name_filter="head")) == ["head"]
    assert tracked_names(new_run().watch(model, name_filter=lambda n: n.endswith("0"))) == \
        ["encoder.0"]
    assert tracked_names(new_run().watch(model, type_filter=[nn.Linear])) == \
        ["encoder.0", "encoder.2", "head"] == tracked_names(new_run().watch(model,
                                                                             type_filter=nn.Linear))
    with pytest.raises(UsageError, match="type_filter takes layer classes"):
        new_run().watch(model, type_filter=["Linear"])
    assert tracked_names(new_run().watch(model, type_filter=[nn.Linear, nn.Embedding],
                                         name_filter=["e"])) == \
        ["embed", "encoder.0", "encoder.2", "head"]
    run = new_run().watch(model, type_filter=[nn.Conv1d, nn.Embedding])
    log = one_step(run, model, torch.randint(0, 10, (3, 5)))
    assert len(log) == 3 and log.grads.abs().max() > 0


def test_watch_nothing_supported_lists_supported_types(new_run):
    with pytest.raises(UsageError) as err:
        new_run().watch(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))
    message = str(err.value)
    for name in ("Linear", "Conv2d", "Conv1d", "Embedding"):
        assert name in message
    with pytest.raises(UsageError, match="Linear"):
        new_run().watch(make_mlp(), name_filter=["nope"])


def test_watch_does_not_change_requires_grad(new_run):
    seeded(1)
    model = Mixed()
    model.encoder[0].weight.requires_grad_(False)
    model.head.bias.requires_grad_(False)
    before = {k: p.requires_grad for k, p in model.named_parameters()}
    run = new_run(include_bias=True).watch(model).add_lora(rank=2)
    one_step(run, model, torch.randint(0, 10, (2, 5)))
    run.finalize()
    assert {k: p.requires_grad for k, p in model.named_parameters()} == before
    assert model.encoder[0].weight.grad is None


def test_watch_unwraps_data_parallel(new_run):
    model = make_mlp()
    assert tracked_names(new_run().watch(nn.DataParallel(model))) == ["0", "2"]


# --------------------------------------------------------------------------- setup
def test_setup_validation(new_run):
    run = new_run().watch(make_mlp())
    with pytest.raises(ConfigError, match="'activations'"):
        run.setup({"activations": ["log"]})
    with pytest.raises(ConfigError, match="'log'"):
        run.setup({"forward": ["log"]})
    with pytest.raises(ConfigError, match="dict"):
        run.setup(["grad"])
    run.setup({"grad": "save", "forward": ["cov"]})  # LogIX spellings
    assert run.capture_spec.log_grad and run.capture_spec.forward_covariance and not run.capture_spec.grad_covariance


# --------------------------------------------------------------------------- protocol errors
def test_protocol_errors(new_run):
    g = seeded(2)
    model = make_mlp()
    x = torch.randn(3, 6, generator=g)
    run = new_run()
    with pytest.raises(UsageError, match="watch"):
        run.start(data_id=[0, 1, 2])
    run.watch(model)
    with pytest.raises(UsageError, match="No step"):
        run.get_log()
    with pytest.raises(UsageError, match="without start"):
        run.end()
    run.start(data_id=[0, 1, 2])
    with pytest.raises(UsageError, match="twice"):
        run.start(data_id=[0, 1, 2])
    with pytest.raises(UsageError, match="inside a step"):
        run.finalize()
    model(x).sum().backward()
    run.end()
    with pytest.raises(UsageError, match="without start"):
        run.end()

    with pytest.raises(UsageError, match="2 examples but the batch has 3"):
        one_step(run, model, x, ids=[0, 1])
    with pytest.raises(UsageError, match="duplicates"):
        one_step(run, model, x, ids=["a", "b", "a"])
    with pytest.raises(UsageError, match="duplicates"):
        one_step(run, model, x, ids=torch.tensor([4, 5, 4]))
    with pytest.raises(UsageError, match="duplicates"):
        one_step(run, model, x, ids=torch.tensor([[1, 2], [3, 4], [1, 2]]))
    with pytest.raises(UsageError, match="str or int"):
        one_step(run, model, x, ids=[0, 1.5, 2])
    with pytest.raises(UsageError, match="No gradient"):
        with run(data_id=[0, 1, 2]):
            model(x)  # no backward
    assert not model[0]._forward_hooks


def test_mask_shape_errors(new_run):
    g = seeded(3)
    model = make_mlp()
    x = torch.randn(3, 4, 6, generator=g)  # [B, T, in]
    run = new_run().watch(model)
    with pytest.raises(UsageError, match="mask"):
        one_step(run, model, x, mask=torch.ones(2, 4))  # wrong batch
    assert not model[0]._forward_hooks and run._steps.current is None
    with pytest.raises(UsageError, match="mask"):
        one_step(run, model, x, mask=torch.ones(3, 5))  # wrong number of tokens
    with pytest.raises(UsageError, match="mask"):
        one_step(run, model, x, mask=[[1, 1, 1, 1]] * 3)  # not a tensor
    log = one_step(run, model, x, mask=torch.ones(3, 4))
    assert len(log) == 3


def test_context_manager_removes_hooks(new_run):
    g = seeded(4)
    model = make_conv_model(dims=2, size=5, seed=4)
    run = new_run().watch(model).add_lora(rank=2)
    modules = [model.conv, model.head]
    x = torch.randn(2, 4, 5, 5, generator=g)
    assert all(not m._forward_hooks for m in modules)
    with run(data_id=["a", "b"]) as active:
        assert active is run
        assert all(len(m._forward_hooks) == 1 for m in modules)
        model(x).pow(2).sum().backward()
    assert all(not m._forward_hooks for m in modules)
    assert run.get_log().data_ids == ["a", "b"] and run.get_log().grads.abs().max() > 0
    # An exception inside the block removes the hooks too, and the run can go on.
    with pytest.raises(ValueError):
        with run(data_id=["c", "d"]):
            raise ValueError("user code failed")
    assert all(not m._forward_hooks for m in modules)
    log = one_step(run, model, x, ids=["e", "f"])
    assert log.data_ids == ["e", "f"]
    # start()/end() too.
    run.start(data_id=[1, 2])
    model(x).sum().backward()
    run.end()
    assert all(not m._forward_hooks and not m._backward_hooks for m in modules)


def test_scale_multiplies_logged_gradients(new_run):
    g = seeded(5)
    model = make_mlp()
    x = torch.randn(3, 6, generator=g)
    run = new_run().watch(model)
    summed = one_step(run, model, x).grads.clone()
    with run(data_id=[0, 1, 2], scale=3.0):
        model(x).pow(2).sum().div(3).backward()  # a mean loss, rescaled
    torch.testing.assert_close(run.get_log().grads, summed, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [0.0, -2.0, float("nan"), float("inf"), 1e40, "8", True])
def test_a_scale_that_is_not_a_finite_positive_number_is_refused(new_run, scale):
    """0 logged zeros and a negative scale flipped every sign, silently; others failed late."""
    run = new_run().watch(make_mlp())
    with pytest.raises(UsageError, match="scale must be a finite number > 0"):
        run.start(data_id=[0, 1, 2], scale=scale)
    assert run._steps.current is None  # nothing was attached: the next step starts cleanly


# --------------------------------------------------------------------------- data ids
def test_token_id_tensor_hashes_stably():
    tokens = torch.tensor([[5, 7, 0, 0], [5, 7, 1, 0], [9, 9, 9, 9]])
    ids = normalize_data_ids(tokens)
    expected = [hashlib.sha1(np.asarray(row, dtype="<i8").tobytes()).hexdigest()[:16]
                for row in tokens.tolist()]
    assert ids == expected and len(set(ids)) == 3
    assert normalize_data_ids(tokens.to(torch.int32)) == ids
    assert normalize_data_ids(tokens.clone()) == ids
    assert normalize_data_ids(tokens[1:]) == ids[1:]  # an example's id is its own
    assert normalize_data_ids(torch.tensor([3, 1, 2])) == [3, 1, 2]
    assert normalize_data_ids(["x", 2]) == ["x", 2]
    assert normalize_data_ids(np.array([4, 5])) == [4, 5]
    with pytest.raises(UsageError):
        normalize_data_ids(torch.tensor([0.5, 1.5]))
    with pytest.raises(UsageError):
        normalize_data_ids(torch.tensor(3))


def test_token_id_data_ids_in_a_step(new_run):
    seeded(6)
    model = make_embedding_model()
    tokens = torch.randint(0, 11, (3, 5))
    run = new_run().watch(model)
    with run(data_id=tokens):
        model(tokens).sum().backward()
    assert run.get_log().data_ids == normalize_data_ids(tokens)


def test_token_ids_with_a_mask_are_hashed_over_the_real_tokens(new_run):
    """The same sequence gets the same id whatever padding (length, side) its batch needed, so
    on_duplicate sees it again; without padding the id is the plain row hash."""
    sequences = [[5, 7, 3], [2, 8]]

    def padded(length, left=False):
        tokens, mask = torch.zeros(2, length, dtype=torch.long), torch.zeros(2, length)
        for i, seq in enumerate(sequences):
            span = slice(length - len(seq), length) if left else slice(0, len(seq))
            tokens[i, span], mask[i, span] = torch.tensor(seq), 1.0
        return tokens, mask

    ids = normalize_data_ids(*padded(7))
    assert ids == normalize_data_ids(*padded(5)) == normalize_data_ids(*padded(4, left=True))
    assert ids == [normalize_data_ids(torch.tensor([seq]))[0] for seq in sequences]
    assert normalize_data_ids(padded(7)[0]) != ids  # no mask: padding is part of the row
    assert normalize_data_ids(torch.tensor([[1, 2]]), torch.ones(1, 2)) == \
        normalize_data_ids(torch.tensor([[1, 2]]))

    seeded(8)
    model = make_embedding_model()
    run = new_run(on_duplicate="skip").watch(model)
    run.setup({"grad": ["log"]}).save(True)
    tokens, mask = padded(7)
    with run(data_id=tokens, mask=mask):
        model(tokens).sum().backward()
    tokens, mask = padded(5)
    with pytest.warns(UserWarning, match="Skipped 2 rows"), run(data_id=tokens, mask=mask):
        model(tokens).sum().backward()
    run.finalize()
    assert run.reader().read_all()[0] == ids


# --------------------------------------------------------------------------- module level
def test_shortcuts_raise_before_init():
    for name in ("watch", "add_lora", "setup", "start", "end", "get_log", "finalize"):
        with pytest.raises(UsageError, match="logix.init"):
            getattr(logix, name)()
    with pytest.raises(UsageError, match="logix.init"):
        logix.get_run()


def test_shortcuts_drive_the_current_run(tmp_root):
    g = seeded(7)
    model = make_mlp()
    run = logix.init("shortcut", root_dir=tmp_root, rank=2)
    assert logix.get_run() is run
    logix.watch(model)
    logix.add_lora()
    logix.setup({"grad": ["log"]})
    logix.save(True)
    logix.start(data_id=[0, 1])
    model(torch.randn(2, 6, generator=g)).sum().backward()
    logix.end()
    assert logix.get_log() is run.get_log()
    assert run.projections["0"].p_in.shape == (2, 6)
    logix.finalize()
    assert run.reader().rows == 2
    assert logix.watch.__doc__ == logix.Run.watch.__doc__
    assert logix.watch.__name__ == "watch"


def test_import_is_light():
    code = ("import sys, logix; heavy = [m for m in ('transformers', 'lightning', "
            "'pytorch_lightning', 'matplotlib', 'faiss', 'scipy', 'sklearn') if m in sys.modules];"
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- StepRows
def test_step_log_views(new_run):
    g = seeded(8)
    model = make_mlp()
    run = new_run().watch(model).add_lora(rank=2)
    first = one_step(run, model, torch.randn(3, 6, generator=g), ids=["a", "b", "c"]).clone()
    ids, grads = first  # unpacks like LogIX's (data_id, log) pair
    assert ids == ["a", "b", "c"] and grads.shape == (3, 2 * 2 + 2 * 2)
    assert torch.equal(first.module("2"), grads[:, 4:].reshape(3, 2, 2))
    with pytest.raises(UsageError, match="not in this log"):
        first.module("nope")
    second = one_step(run, model, torch.randn(2, 6, generator=g), ids=["d", "e"])
    assert not torch.equal(first.grads[:2], second.grads)  # clone() did not alias
    both = logix.StepRows.concat([first, second])
    assert both.data_ids == ["a", "b", "c", "d", "e"]
    assert torch.equal(both.grads, torch.cat([first.grads, second.grads]))
    with pytest.raises(UsageError):
        logix.StepRows.concat([])
    other = new_run().watch(model).add_lora(rank=3)
    with pytest.raises(UsageError, match="different"):
        logix.StepRows.concat([first, one_step(other, model, torch.randn(2, 6, generator=g))])


def test_watch_refuses_what_is_not_a_module_and_skips_frozen_layers(new_run):
    with pytest.raises(UsageError, match="torch.nn.Module, got str"):
        new_run().watch("model")
    model = make_mlp()
    model[0].weight.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"frozen layers .*\['0'\]"):
        run = new_run().watch(model)
    assert list(run.modules) == ["2"]
    assert list(new_run("named").watch(model, name_filter=["0", "2"]).modules) == ["0", "2"]


def test_a_run_appending_to_an_existing_log_says_so(new_run):
    model = make_mlp()
    first = new_run().watch(model).setup({"grad": ["log"]}).save(True)
    one_step(first, model, torch.randn(3, 6))
    first.finalize()
    again = new_run().watch(model).setup({"grad": ["log"]}).save(True)
    with pytest.warns(UserWarning, match="already holds a log of 3 rows: this run appends"):
        one_step(again, model, torch.randn(3, 6), ids=[10, 11, 12])


def test_a_step_inside_a_step_is_refused_before_anything_runs(new_run):
    import os

    run = new_run(rank=2)
    model = make_mlp(seed=0)
    run.watch(model).add_lora()
    run.start(data_id=[0, 1])
    run.save(True)  # the next step would write: it must not open the log
    with pytest.raises(UsageError, match="called twice"):
        run.start(data_id=[2, 3])
    assert not os.path.exists(run.project_dir)
    model(torch.randn(2, 6)).sum().backward()
    run.end()
    assert run.get_log().data_ids == [0, 1]
