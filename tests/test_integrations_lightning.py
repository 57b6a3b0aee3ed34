"""Lightning integration: logged rows equal brute-force per-example gradients of the summed loss,
with and without gradient accumulation; training is untouched; the old `patch` API works."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

lightning = pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402

import logix  # noqa: E402
from logix.integrations.lightning import LogIXCallback, influence_of  # noqa: E402
from logix.scheduler import LogIXScheduler  # noqa: E402
from conftest import project  # noqa: E402

VOCAB, T, BATCH = 32, 6, 4

pytestmark = pytest.mark.filterwarnings("ignore")


# ---------------------------------------------------------------------- modules and data
class Classifier(pl.LightningModule):
    """Float features, cross-entropy averaged over the batch (Lightning's usual loss)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.model(batch["x"]), batch["y"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


class TokenModel(pl.LightningModule):
    """Next-token prediction, cross-entropy averaged over the real tokens of the batch."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, 16), nn.GELU(),
                                   nn.Linear(16, VOCAB))

    def training_step(self, batch, batch_idx):
        logits = self.model(batch["input_ids"])
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB),
                               batch["labels"][:, 1:].reshape(-1), ignore_index=-100)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def tokens_of(batch):
    return float((batch["labels"][:, 1:] != -100).sum())


def make_rows(kind, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        if kind == "cls":
            rows.append({"x": torch.randn(6, generator=g),
                         "y": torch.randint(0, 3, (), generator=g), "idx": torch.tensor(i)})
        else:
            length = int(torch.randint(3, T + 1, (1,), generator=g))
            mask = (torch.arange(T) < length).long()
            ids = torch.randint(1, VOCAB, (T,), generator=g) * mask
            rows.append({"input_ids": ids, "attention_mask": mask,
                         "labels": torch.where(mask.bool(), ids, -100)})
    return rows


def loader(rows):
    return torch.utils.data.DataLoader(rows, batch_size=BATCH, shuffle=True,
                                       generator=torch.Generator().manual_seed(0))


def make_module(kind, seed=0):
    return Classifier(seed) if kind == "cls" else TokenModel(seed)


def callback_for(kind, run, **kw):
    if kind == "cls":
        return LogIXCallback(run, data_id_fn=lambda b: b["idx"], **kw)
    return LogIXCallback(run, loss_scale_fn=tokens_of, **kw)


def fit(module, rows, callbacks, ga=1, epochs=1):
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs,
                         accumulate_grad_batches=ga, enable_progress_bar=False, logger=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         callbacks=callbacks)
    trainer.fit(module, loader(rows))
    return trainer


class Recorder(pl.Callback):
    """Test helper: the weights and the batch at the start of each training batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights = copy.deepcopy(pl_module.model.state_dict())
        self.batch = {k: v.clone() for k, v in batch.items()}


def new_run(tmp_path, module, name="p", rank=4, **config):
    run = logix.init(name, root_dir=str(tmp_path / "logs"), **config)
    run.watch(module.model)
    run.add_lora(rank=rank)
    run.setup({"grad": ["log"]})
    run.save(True)
    return run


# ---------------------------------------------------------------------- brute force
def brute_force_rows(module, weights, batch, kind, run):
    model = copy.deepcopy(module.model)
    model.load_state_dict(weights)
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(run.modules)
    tracked = {n: params[n + ".weight"] for n in names}

    def loss_one(w, example):
        p = {**params, **{n + ".weight": v for n, v in w.items()}}
        if kind == "cls":
            logits = functional_call(model, p, (example["x"][None],))
            return F.cross_entropy(logits, example["y"][None], reduction="sum")
        logits = functional_call(model, p, (example["input_ids"][None],))[0]
        return F.cross_entropy(logits[:-1], example["labels"][1:], ignore_index=-100,
                               reduction="sum")

    grads = vmap(grad(loss_one), in_dims=(None, 0))(tracked, batch)
    parts = []
    for name in names:
        g = grads[name]
        if isinstance(run.modules[name].module, nn.Embedding):
            g = g.transpose(1, 2)  # weight [num_embeddings, dim]; LoGra's G is [dim, ids]
        proj = run.projections[name]
        g = project(g, proj.p_in, proj.p_out)
        parts.append(g.reshape(g.shape[0], -1))
    return torch.cat(parts, 1)


def assert_rows_close(logged, expected):
    assert logged.shape == expected.shape and logged.abs().sum() > 0
    torch.testing.assert_close(logged, expected, atol=1e-4 * expected.abs().max(), rtol=1e-4)


# ---------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind,ga,n", [("cls", 1, 12), ("cls", 2, 16), ("tokens", 1, 12),
                                       ("tokens", 2, 16), ("tokens", 2, 12)])
def test_logged_rows_equal_brute_force_at_final_step(tmp_path, kind, ga, n):
    module = make_module(kind)
    run = new_run(tmp_path, module)
    recorder = Recorder()
    fit(module, make_rows(kind, n), [callback_for(kind, run), recorder], ga=ga)
    log = run.get_log()
    expected = brute_force_rows(module, recorder.weights, recorder.batch, kind, run)
    assert_rows_close(log.grads, expected)
    ids, rows = run.reader().read_all()  # finalized at train end
    assert rows.shape[0] == n and len(set(ids)) == n
    if kind == "cls":
        assert sorted(ids) == list(range(n)) and log.data_ids == recorder.batch["idx"].tolist()


@pytest.mark.parametrize("kind", ["cls", "tokens"])
def test_training_is_unchanged_by_the_callback(tmp_path, kind):
    rows = make_rows(kind, 16)
    plain, logged = make_module(kind), make_module(kind)
    fit(plain, rows, [], ga=2, epochs=2)
    run = new_run(tmp_path, logged, on_duplicate="allow")
    fit(logged, rows, [callback_for(kind, run, epochs="all")], ga=2, epochs=2)
    assert run.reader().rows == 32  # both epochs
    start = make_module(kind).state_dict()
    moved = 0
    for (name, a), b in zip(plain.state_dict().items(), logged.state_dict().values()):
        assert torch.equal(a, b), name
        moved += not torch.equal(a, start[name])
    assert moved > 0


def test_only_the_last_epoch_is_logged_by_default(tmp_path, recwarn):
    module = make_module("cls")
    run = new_run(tmp_path, module)
    recorder = Recorder()
    fit(module, make_rows("cls", 12), [callback_for("cls", run), recorder], epochs=3)
    assert run.reader().rows == 12
    assert not [w for w in recwarn if "already logged" in str(w.message)]
    expected = brute_force_rows(module, recorder.weights, recorder.batch, "cls", run)
    assert_rows_close(run.get_log().grads, expected)


def test_scheduler_runs_one_pass_per_epoch(tmp_path):
    module = make_module("cls")
    run = logix.init("p", root_dir=str(tmp_path / "logs"), lora={"rank": 4})
    run.watch(module.model)
    scheduler = LogIXScheduler(run, lora="pca", hessian="raw", save="grad")
    fit(module, make_rows("cls", 12), [callback_for("cls", run, scheduler=scheduler)], epochs=2)
    assert run.projection_meta["init"] == "pca" and run.reader().rows == 12
    assert any(k.endswith("::grad") for k in run.statistics.state_dict())


class SkipsOddBatches(Classifier):
    def training_step(self, batch, batch_idx):
        return None if batch_idx % 2 else super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        return F.cross_entropy(self.model(batch["x"]), batch["y"])


def test_skipped_batches_are_not_logged_and_validation_is_not_logged(tmp_path):
    module = SkipsOddBatches()
    run = new_run(tmp_path, module)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, enable_progress_bar=False,
                         logger=False, enable_checkpointing=False, enable_model_summary=False,
                         val_check_interval=1, callbacks=[callback_for("cls", run)])
    rows = make_rows("cls", 16)
    trainer.fit(module, loader(rows), loader(rows))
    assert run.reader().rows == 8  # batches 0 and 2 of 4, no validation rows


def test_old_patch_api_logs_post_hoc_with_a_scheduler(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from logix.lightning import LogIXArguments, patch

    args = LogIXArguments(project="old", lora="pca", hessian="kfac", save="grad")
    Module, Trainer = patch(Classifier, pl.Trainer, args,
                            data_id_extractor=lambda b: b["idx"])
    assert logix._current is None  # the run is made when it is needed, not at patch time
    module = Module()
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, enable_progress_bar=False,
                      logger=False, enable_checkpointing=False)
    rows = make_rows("cls", 12)
    before = copy.deepcopy(module.state_dict())
    trainer.extract_log(module, loader(rows))
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())  # no training
    run = module.logix
    assert run.projection_meta["init"] == "pca" and run.reader().rows == 12
    result = influence_of(run, module, loader(make_rows("cls", 4, seed=5)),
                          data_id_fn=lambda b: b["idx"])
    assert result["influence"].shape == (4, 12)
    assert trainer.influence(module, loader(rows))["influence"].shape == (12, 12)
