"""MAGIC (logix.influence.magic): metagradients of a replayed run equal finite differences of the
retrained model's query losses under small data-weight changes; runs that cannot be replayed are
refused; the result works with score files and the LDS."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import logix
from logix.errors import UsageError
from logix.evaluation import lds
from logix.influence.magic import magic_scores
from logix.storage.replay import RECORD_FILE, MagicRecorder, load_record
from logix.storage.scores import load_scores, save_scores

N, D, CLASSES, BATCH, STEPS = 20, 5, 3, 6, 24


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    qx = torch.randn(4, D, generator=g, dtype=torch.float64)
    qy = torch.randint(0, CLASSES, (4,), generator=g)
    order = [torch.randperm(N, generator=g)[:BATCH].tolist() for _ in range(STEPS)]
    return x, y, qx, qy, order


X, Y, QX, QY, ORDER = data()


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, CLASSES)).double()


def loss_fn(model, batch):  # per-example losses [B]
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def get_batch(ids):
    return X[ids], Y[ids]


OPTIMIZERS = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    "sgd-nesterov-dampening": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, dampening=0.1,
                                                        weight_decay=0.02),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.1),
    "adam-l2": lambda p: torch.optim.Adam(p, lr=0.02, betas=(0.8, 0.99), weight_decay=0.01),
}


def train(optimizer, weights=None, folder=None, every=5, reduction="mean", skip_record=None):
    """The run: a fixed order of batches, a step lr schedule, data weights (default 1)."""
    model = make_model()
    opt = OPTIMIZERS[optimizer](model.parameters())
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=8, gamma=0.5)
    recorder = MagicRecorder(folder, model, opt, every=every, reduction=reduction, seed=0) \
        if folder is not None else None
    w = torch.ones(N, dtype=torch.float64) if weights is None else weights
    for t, ids in enumerate(ORDER):
        if recorder is not None and t != skip_record:
            recorder.record(ids)
        opt.zero_grad()
        losses = w[ids] * loss_fn(model, get_batch(ids))
        (losses.mean() if reduction == "mean" else losses.sum()).backward()
        opt.step()
        schedule.step()
    if recorder is not None:
        recorder.finish()
    return model


def query_losses(model):
    with torch.no_grad():
        return loss_fn(model, (QX, QY))


@pytest.mark.parametrize("optimizer,reduction", [("sgd-momentum-wd", "mean"),
                                                 ("sgd-nesterov-dampening", "sum"),
                                                 ("adamw", "mean"), ("adam-l2", "mean")])
def test_metagradients_equal_finite_differences(tmp_path, optimizer, reduction):
    train(optimizer, folder=tmp_path / "replay", reduction=reduction)
    result = magic_scores(tmp_path / "replay", make_model(), loss_fn, get_batch, (QX, QY),
                          progress=False)
    scores = result["influence"]
    assert scores.shape == (4, len(result["tgt_ids"])) and scores.abs().max() > 0
    assert result["meta"]["replay_error"] < 1e-12
    eps = 1e-5
    for example in (ORDER[0][0], ORDER[-1][-1], ORDER[STEPS // 2][2]):
        up, down = (torch.ones(N, dtype=torch.float64) for _ in range(2))
        up[example] += eps
        down[example] -= eps
        loss_up = query_losses(train(optimizer, up, reduction=reduction))
        loss_down = query_losses(train(optimizer, down, reduction=reduction))
        finite = -(loss_up - loss_down) / (2 * eps)  # -dQ/dw: > 0 helpful
        got = scores[:, result["tgt_ids"].index(example)]
        error = float((got - finite).abs().max() / finite.abs().max())
        assert error <= 1e-3, (example, got, finite)
        assert error <= 1e-6  # measured ~1e-10 in float64


def test_param_groups_and_frozen_weights(tmp_path):
    """Fine-tuning: the first layer's weight frozen (outside the optimizer), two groups with
    their own lr and weight decay."""

    def run(weights=None, folder=None):
        model = make_model()
        model[0].weight.requires_grad_(False)
        opt = torch.optim.SGD([{"params": [model[0].bias], "lr": 0.05},
                               {"params": model[2].parameters(), "weight_decay": 0.01}],
                              lr=0.1, momentum=0.9)
        recorder = MagicRecorder(folder, model, opt, every=7) if folder else None
        w = torch.ones(N, dtype=torch.float64) if weights is None else weights
        for ids in ORDER:
            if recorder:
                recorder.record(ids)
            opt.zero_grad()
            (w[ids] * loss_fn(model, get_batch(ids))).mean().backward()
            opt.step()
        if recorder:
            recorder.finish()
        return model

    run(folder=tmp_path / "r")
    result = magic_scores(tmp_path / "r", make_model(), loss_fn, get_batch, (QX, QY),
                          progress=False)
    example, eps = ORDER[3][1], 1e-5
    up, down = torch.ones(N, dtype=torch.float64), torch.ones(N, dtype=torch.float64)
    up[example] += eps
    down[example] -= eps
    finite = -(query_losses(run(up)) - query_losses(run(down))) / (2 * eps)
    got = result["influence"][:, result["tgt_ids"].index(example)]
    assert float((got - finite).abs().max() / finite.abs().max()) <= 1e-6


def test_bisect_schedule_matches_and_holds_fewer_states(tmp_path):
    train("sgd-momentum-wd", folder=tmp_path / "r", every=12)
    store = magic_scores(tmp_path / "r", make_model(), loss_fn, get_batch, (QX, QY),
                         progress=False)
    bisect = magic_scores(tmp_path / "r", make_model(), loss_fn, get_batch, (QX, QY),
                          schedule="bisect", progress=False)
    assert torch.allclose(store["influence"], bisect["influence"], rtol=1e-10, atol=1e-14)
    assert store["meta"]["states_held"] == 13  # a segment of 12 steps and its start
    assert bisect["meta"]["states_held"] <= 6  # log2(12) + 2
    assert store["meta"]["forward_steps"] == STEPS  # one replay of training
    assert bisect["meta"]["forward_steps"] > STEPS


def test_record_on_disk(tmp_path):
    folder = tmp_path / "replay"
    train("adamw", folder=folder, every=5)
    files = sorted(os.listdir(folder))
    assert not [f for f in files if f.endswith(".tmp")]
    record = json.loads((folder / RECORD_FILE).read_text())
    assert record["finished"] and record["checkpoints"] == [0, 5, 10, 15, 20, 24]
    assert record["optimizer"]["kind"] == "adamw"
    assert record["optimizer"]["groups"][0]["hparams"]["weight_decay"] == 0.1
    assert len([f for f in files if f.startswith("checkpoint-")]) == 6
    assert len([f for f in files if f.startswith("steps-")]) == 5
    steps = load_record(folder).steps
    assert [s["ids"] for s in steps] == ORDER
    assert [s["lr"][0] for s in steps[7:9]] == [0.02, 0.01]  # the schedule's drop


def test_unsupported_optimizer_is_refused(tmp_path):
    model = make_model()
    with pytest.raises(UsageError, match="Supported optimizers: torch.optim.SGD.*AdamW"):
        MagicRecorder(tmp_path / "r", model, torch.optim.RMSprop(model.parameters()))
    with pytest.raises(UsageError, match="amsgrad=True"):
        MagicRecorder(tmp_path / "r", model,
                      torch.optim.AdamW(model.parameters(), amsgrad=True))


def test_unknown_data_order_is_refused(tmp_path):
    with pytest.warns(RuntimeWarning, match="data order"):
        train("sgd-momentum-wd", folder=tmp_path / "r", skip_record=3)
    with pytest.raises(UsageError, match="step 3 ran without record\\(ids\\).*data order"):
        magic_scores(tmp_path / "r", make_model(), loss_fn, get_batch, (QX, QY),
                     progress=False)


def test_unfinished_and_stochastic_runs_are_refused(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = MagicRecorder(tmp_path / "crashed", model, opt, every=2)
    for ids in ORDER[:3]:
        recorder.record(ids)
        opt.zero_grad()
        loss_fn(model, get_batch(ids)).mean().backward()
        opt.step()
    with pytest.raises(UsageError, match="did not finish"):
        load_record(tmp_path / "crashed")
    assert json.loads((tmp_path / "crashed" / RECORD_FILE).read_text())["checkpoints"] == [0, 2]

    noisy = nn.Sequential(nn.Linear(D, 8), nn.Dropout(0.5), nn.Linear(8, CLASSES)).double()
    with pytest.warns(RuntimeWarning, match="stochastic"):
        MagicRecorder(tmp_path / "noisy", noisy, torch.optim.SGD(noisy.parameters(), lr=0.1)
                      ).finish()
    with pytest.raises(UsageError, match="Dropout|stochastic"):
        load_record(tmp_path / "noisy")


def test_a_replay_that_differs_from_the_run_is_refused(tmp_path):
    train("sgd-momentum-wd", folder=tmp_path / "r")

    def shuffled(ids):  # the right examples in the wrong order
        return X[ids[::-1]], Y[ids]

    with pytest.raises(UsageError, match="does not reproduce its checkpoint"):
        magic_scores(tmp_path / "r", make_model(), loss_fn, shuffled, (QX, QY), progress=False)


def test_result_feeds_score_files_and_lds(tmp_path):
    train("sgd-momentum-wd", folder=tmp_path / "r")
    result = logix.magic_scores(tmp_path / "r", make_model(), loss_fn, get_batch, (QX, QY),
                                query_ids=["a", "b", "c", "d"], progress=False)
    assert result["src_ids"] == ["a", "b", "c", "d"]
    assert sorted(result["tgt_ids"]) == sorted({i for ids in ORDER for i in ids})
    meta = result["meta"]
    assert meta["method"] == "magic" and meta["steps"] == STEPS and meta["seconds"] > 0
    loaded = load_scores(save_scores(tmp_path / "magic.safetensors", result))
    assert loaded["tgt_ids"] == result["tgt_ids"]
    assert torch.allclose(loaded["influence"].double(), result["influence"], rtol=1e-6)
    masks = torch.rand(5, len(result["tgt_ids"]), generator=torch.Generator().manual_seed(0)) > .5
    assert -1 <= lds(result["influence"], masks, torch.randn(5, 4))["lds"] <= 1


def test_run_records_beside_its_project(tmp_path):
    run = logix.init("magic-demo", root_dir=str(tmp_path))
    model = make_model()
    opt = OPTIMIZERS["sgd-momentum-wd"](model.parameters())
    with run.magic_recorder(model, opt, every=10) as recorder:
        for ids in ORDER:
            recorder.record(ids)
            opt.zero_grad()
            loss_fn(model, get_batch(ids)).mean().backward()
            opt.step()
    assert (tmp_path / "magic-demo" / "replay" / RECORD_FILE).is_file()
    result = logix.magic_scores(run.project_dir, make_model(), loss_fn, get_batch, (QX, QY),
                                progress=False)
    assert result["meta"]["checkpoints"] == 4  # steps 0, 10, 20 and the last (24)
    with pytest.raises(UsageError, match="already holds a recorded run"):
        run.magic_recorder(model, opt)
