"""Hugging Face integration: logged rows equal brute-force per-example gradients of the summed
loss, training is untouched, evaluation is not logged, and the post-hoc / old-API doors work.

Tiny offline models from configs (eager attention, no dropout); data made here.
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, Trainer,
    TrainerCallback, TrainingArguments,
)
from transformers.pytorch_utils import Conv1D  # noqa: E402

import logix  # noqa: E402
from logix.errors import UsageError  # noqa: E402
from logix.integrations._common import example_ids  # noqa: E402
from logix.integrations.huggingface import (  # noqa: E402
    LogIXCallback, extract_log, influence_of,
)
from logix.scheduler import LogIXScheduler  # noqa: E402
from conftest import project  # noqa: E402

VOCAB, T, BATCH = 64, 8, 4

pytestmark = pytest.mark.filterwarnings("ignore")


# ---------------------------------------------------------------------- models and data
def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager"))


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=16, num_labels=3, attn_implementation="eager"))


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def make_data(kind, n, seed=1, with_ids=False):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(4, T + 1, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (T,), generator=g)
        mask = (torch.arange(T) < length).long()
        ids = ids * mask  # pad id 0
        row = {"input_ids": ids, "attention_mask": mask}
        if kind == "lm":
            row["labels"] = torch.where(mask.bool(), ids, -100)
        else:
            row["labels"] = torch.randint(0, 3, (), generator=g)
        if with_ids:
            row["idx"] = torch.tensor(1000 + i)
        rows.append(row)
    return Rows(rows)


def make_model(kind, seed=0):
    return tiny_gpt2(seed) if kind == "lm" else tiny_bert(seed)


def tracked_types(kind):
    return [Conv1D] if kind == "lm" else [nn.Linear]


def training_args(tmp_path, ga=1, num_train_epochs=1, **kw):
    return TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ga, num_train_epochs=num_train_epochs, learning_rate=1e-2,
        use_cpu=True,
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0, **kw)


class Recorder(TrainerCallback):
    """Test helper: the weights at the start of each optimizer step and the inputs of the last
    training micro-batch (after LogIX's hook has seen them)."""

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            self.inputs = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}

    def on_step_begin(self, args, state, control, model=None, **kw):
        self.weights = copy.deepcopy(model.state_dict())

    def on_train_end(self, args, state, control, **kw):
        self.handle.remove()


def new_run(tmp_path, model, kind, name="p", rank=4, **config):
    run = logix.init(name, root_dir=str(tmp_path / "logs"), **config)
    run.watch(model, type_filter=tracked_types(kind))
    run.add_lora(rank=rank)
    run.setup({"grad": ["log"]})
    run.save(True)
    return run


# ---------------------------------------------------------------------- brute force
def brute_force_rows(model, weights, batch, kind, run):
    """vmap(grad) of each example's SUMMED loss w.r.t. every tracked weight, projected
    P_out G P_in^T, laid out like a log row."""
    model = copy.deepcopy(model)
    model.load_state_dict(weights)
    model.eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(run.modules)
    tracked = {n: params[n + ".weight"] for n in names}
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if kind == "lm":
        def loss_one(w, i, m, y):
            p = {**params, **{n + ".weight": v for n, v in w.items()}}
            logits = functional_call(model, p, (), dict(input_ids=i[None],
                                                        attention_mask=m[None])).logits[0]
            return F.cross_entropy(logits[:-1], y[1:], ignore_index=-100, reduction="sum")
        masks = mask
    else:
        def loss_one(w, i, m, y):
            p = {**params, **{n + ".weight": v for n, v in w.items()}}
            logits = functional_call(model, p, (), dict(input_ids=i[None],
                                                        attention_mask=m[None])).logits
            return F.cross_entropy(logits, y[None], reduction="sum")
        # BERT's 2-D mask path branches on data; give it the additive 4-D mask instead.
        neg = torch.finfo(torch.float32).min
        masks = ((1 - mask[:, None, None, :].float()) * neg).expand(-1, 1, mask.shape[1], -1)
    grads = vmap(grad(loss_one), in_dims=(None, 0, 0, 0))(tracked, ids, masks, labels)
    parts = []
    for name in names:
        g = grads[name]  # [B, *weight.shape]
        if isinstance(run.modules[name].module, Conv1D):
            g = g.transpose(1, 2)  # Conv1D stores [in, out]
        proj = run.projections[name]
        g = project(g, proj.p_in, proj.p_out)  # [B, r_out, r_in]
        parts.append(g.reshape(g.shape[0], -1))
    return torch.cat(parts, 1)


def assert_rows_close(logged, expected):
    assert logged.shape == expected.shape and logged.abs().sum() > 0
    scale = expected.abs().max()
    torch.testing.assert_close(logged, expected, atol=1e-4 * scale, rtol=1e-4)


def train(model, data, tmp_path, callbacks, ga=1, trainer_cls=Trainer, eval_dataset=None, **kw):
    trainer = trainer_cls(model=model, args=training_args(tmp_path, ga, **kw), train_dataset=data,
                          eval_dataset=eval_dataset, callbacks=callbacks)
    trainer.train()
    return trainer


# ---------------------------------------------------------------------- tests
CASES = [
    ("lm", 1, 12, True),    # num_items_in_batch: sum over tokens / tokens of the step
    ("lm", 2, 16, True),    # ... across two accumulated micro-batches
    ("lm", 2, 16, False),   # model without loss kwargs: token mean, / accumulation steps
    ("lm", 2, 12, False),   # ... where the epoch's last step holds a single micro-batch
    ("cls", 1, 12, True),   # BERT: mean over the micro-batch
    ("cls", 2, 16, True),   # BERT ignores num_items_in_batch: still a micro-batch mean
]


@pytest.mark.parametrize("kind,ga,n,loss_kwargs", CASES)
def test_logged_rows_equal_brute_force_at_final_step(tmp_path, kind, ga, n, loss_kwargs):
    model = make_model(kind)
    if not loss_kwargs:
        model.accepts_loss_kwargs = False
    run = new_run(tmp_path, model, kind)
    recorder = Recorder()
    train(model, make_data(kind, n), tmp_path, [LogIXCallback(run), recorder], ga=ga)

    log = run.get_log()
    batch = recorder.inputs
    assert log.data_ids == example_ids(batch["input_ids"], batch["attention_mask"])
    expected = brute_force_rows(model, recorder.weights, batch, kind, run)
    assert_rows_close(log.grads, expected)
    # every training example was logged once and written at train end (finalize)
    ids, rows = run.reader().read_all()
    assert rows.shape[0] == n and len(set(ids)) == n


@pytest.mark.parametrize("kind", ["lm", "cls"])
def test_training_is_unchanged_by_the_callback(tmp_path, kind):
    data = make_data(kind, 16)
    plain = make_model(kind)
    train(plain, data, tmp_path / "a", [], ga=2)
    logged = make_model(kind)
    run = new_run(tmp_path, logged, kind)
    train(logged, data, tmp_path / "b", [LogIXCallback(run)], ga=2)
    assert run.reader().rows == 16
    before = make_model(kind).state_dict()
    changed = 0
    for (name, a), b in zip(plain.state_dict().items(), logged.state_dict().values()):
        assert torch.equal(a, b), name
        changed += not torch.equal(a, before[name])
    assert changed > 0  # training did move the weights


@pytest.mark.parametrize("epochs,rows", [("last", 8), ("all", 16), ([0], 8)])
def test_which_epochs_are_logged(tmp_path, epochs, rows):
    model = make_model("cls")
    run = new_run(tmp_path, model, "cls", on_duplicate="allow")
    recorder = Recorder()
    train(model, make_data("cls", 8), tmp_path, [LogIXCallback(run, epochs=epochs), recorder],
          num_train_epochs=2)
    assert run.reader().rows == rows
    if epochs != [0]:  # the final step was logged, with the final step's weights
        expected = brute_force_rows(model, recorder.weights, recorder.inputs, "cls", run)
        assert_rows_close(run.get_log().grads, expected)


def test_scheduler_runs_one_pass_per_epoch(tmp_path):
    model = make_model("cls")
    run = logix.init("p", root_dir=str(tmp_path / "logs"), lora={"rank": 4})
    run.watch(model, type_filter=[nn.Linear])
    scheduler = LogIXScheduler(run, lora="pca", hessian="kfac", save="grad")
    with pytest.raises(UsageError, match="num_train_epochs=2"):
        train(model, make_data("cls", 8), tmp_path, [LogIXCallback(run, scheduler=scheduler)])
    train(model, make_data("cls", 8), tmp_path, [LogIXCallback(run, scheduler=scheduler)],
          num_train_epochs=2)
    assert run.projection_meta["init"] == "pca" and run.reader().rows == 8
    assert any(k.endswith("::forward") for k in run.statistics.state_dict())


def test_data_id_column_and_no_logging_during_evaluation(tmp_path):
    model = make_model("cls")
    run = new_run(tmp_path, model, "cls")
    run.setup({"grad": ["log"], "forward": ["covariance"]})
    data = make_data("cls", 12, with_ids=True)
    train(model, data, tmp_path,
          [LogIXCallback(run, data_id_column="idx")], remove_unused_columns=False,
          eval_dataset=make_data("cls", 4, seed=3, with_ids=True), eval_strategy="steps",
          eval_steps=1, per_device_eval_batch_size=4)
    ids, rows = run.reader().read_all()
    assert sorted(ids) == list(range(1000, 1012))  # train rows only, none from the 3 evals
    # the attention mask reached run.start: forward statistics count real tokens only
    real_tokens = sum(int(r["attention_mask"].sum()) for r in data.rows)
    assert run.statistics.counts[("bert.encoder.layer.0.attention.self.query", "forward")] \
        == real_tokens
    # the id column is taken out of the model's inputs only while training
    trainer = Trainer(model=model, args=training_args(tmp_path, remove_unused_columns=False),
                      eval_dataset=make_data("cls", 4, seed=5))
    trainer.evaluate()


def test_data_id_column_dropped_by_trainer_is_explained(tmp_path):
    """Refused at train begin, not after the epochs before the logged one."""
    model = make_model("cls")
    before = copy.deepcopy(model.state_dict())
    run = new_run(tmp_path, model, "cls")
    with pytest.raises(UsageError, match="remove_unused_columns=False"):
        train(model, make_data("cls", 8, with_ids=True), tmp_path,
              [LogIXCallback(run, data_id_column="idx")], num_train_epochs=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_label_smoothing_is_refused_at_train_begin(tmp_path):
    model = make_model("cls")
    before = copy.deepcopy(model.state_dict())
    run = new_run(tmp_path, model, "cls")
    with pytest.raises(UsageError, match=r"label_smoothing_factor=0.1.*loss_scale_fn"):
        train(model, make_data("cls", 8), tmp_path, [LogIXCallback(run)], num_train_epochs=3,
              label_smoothing_factor=0.1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_forgotten_save_warns_at_train_begin(tmp_path):
    model = make_model("cls")
    run = new_run(tmp_path, model, "cls").save(False)
    with pytest.warns(UserWarning, match=r"run.save\(True\) was not called"):
        train(model, make_data("cls", 4), tmp_path, [LogIXCallback(run)])
    assert run.get_log().grads.shape[0] == BATCH  # the last micro-batch, in memory only


def test_a_query_after_training_never_lands_in_the_training_log(tmp_path):
    """Forgetting run.eval() before a hand-made query: refused, not appended to the log;
    influence_of switches to query mode itself and leaves the finalized run there."""
    model = make_model("cls")
    run = new_run(tmp_path, model, "cls")
    train(model, make_data("cls", 8), tmp_path, [LogIXCallback(run)])
    query = make_data("cls", 2, seed=9)
    batch = {k: torch.stack([r[k] for r in query.rows]) for k in query.rows[0]}

    def manual_query():
        with run(data_id=["q0", "q1"]):
            model(**batch).loss.backward()
        return run.get_log()

    with pytest.raises(UsageError, match=r"finalize\(\) closed this training log.*run.eval"):
        manual_query()
    result = influence_of(run, model, query, batch_size=2)
    assert result["influence"].shape == (2, 8)
    assert manual_query().data_ids == ["q0", "q1"]  # still in query mode: kept in memory
    run.eval()
    manual_query()
    assert run.reader().rows == 8


class GALossTrainer(Trainer):
    loss_is_scaled_for_ga = False  # divides even the num_items-normalised loss by GA


def test_unexpected_loss_factor_is_refused(tmp_path):
    model = make_model("lm")
    run = new_run(tmp_path, model, "lm")
    with pytest.raises(UsageError, match="loss_scale_fn"):
        train(model, make_data("lm", 8), tmp_path, [LogIXCallback(run)], ga=2,
              trainer_cls=GALossTrainer)
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_loss_scale_fn_for_a_loss_outside_the_model(tmp_path):
    """compute_loss_func: the model sees no labels, so the user names the factor."""
    def batch_mean(outputs, labels, num_items_in_batch=None):
        return F.cross_entropy(outputs.logits, labels)

    model = make_model("cls")
    run = new_run(tmp_path, model, "cls")
    with pytest.raises(UsageError, match="no `labels`"):
        trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=make_data(
            "cls", 8), callbacks=[LogIXCallback(run)], compute_loss_func=batch_mean)
        trainer.train()

    model = make_model("cls")
    run = new_run(tmp_path, model, "cls", name="q")
    recorder = Recorder()
    data = make_data("cls", 8)
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=data,
                      callbacks=[LogIXCallback(run, loss_scale_fn=lambda inputs: BATCH),
                                 recorder], compute_loss_func=batch_mean)
    trainer.train()
    batch = dict(recorder.inputs)
    # the model got no labels; recover the recorded batch's labels by matching input ids
    by_ids = {tuple(r["input_ids"].tolist()): r["labels"] for r in data.rows}
    batch["labels"] = torch.stack([by_ids[tuple(i.tolist())] for i in batch["input_ids"]])
    expected = brute_force_rows(model, recorder.weights, batch, "cls", run)
    assert_rows_close(run.get_log().grads, expected)


def test_post_hoc_extract_log_and_influence(tmp_path):
    model = make_model("cls")
    train_data, test_data = make_data("cls", 10), make_data("cls", 3, seed=7)
    run = logix.init("post", root_dir=str(tmp_path / "logs"))
    run.watch(model, type_filter=[nn.Linear])
    run.add_lora(rank=4)
    extract_log(run, model, train_data, batch_size=4)
    ids, rows = run.reader().read_all()
    assert len(ids) == 10
    batch = {k: torch.stack([r[k] for r in train_data.rows]) for k in train_data.rows[0]}
    assert_rows_close(rows, brute_force_rows(model, model.state_dict(), batch, "cls", run))

    # a new process: watch + initialize_from_log happen inside influence_of
    fresh = logix.init("post", root_dir=str(tmp_path / "logs"))
    result = influence_of(fresh, model, test_data, batch_size=2)
    assert result["influence"].shape == (3, 10)
    assert result["tgt_ids"] == ids
    assert fresh.reader().rows == 10  # the queries were not written


def test_old_patch_trainer_api(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from logix.huggingface import LogIXArguments, patch_trainer

    LogIXTrainer = patch_trainer(Trainer)
    model = make_model("cls")
    args = LogIXArguments(project="old", lora=True, save="grad", hessian="kfac",
                          data_id="hash", type_filter=[nn.Linear], log_batch_size=4)
    trainer = LogIXTrainer(args, model=model, args=training_args(tmp_path),
                           train_dataset=make_data("cls", 8))
    trainer.extract_log()
    assert trainer.logix.reader().rows == 8
    assert os.path.isfile(tmp_path / "logix_logs" / "old" / "manifest.json")  # the default root
    result = trainer.influence(make_data("cls", 3, seed=9))
    assert result["influence"].shape == (3, 8)
    assert trainer.args.num_train_epochs == 1  # the user's TrainingArguments are untouched


def test_importing_logix_does_not_import_transformers():
    import subprocess
    import sys

    code = "import logix, sys; print('transformers' in sys.modules, 'lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_a_transformers_that_moved_its_loss_fails_in_one_place_naming_loss_scale_fn(monkeypatch):
    """The loss-factor inference reads transformers internals in one small module; when they
    move, the error says what to pass instead."""
    import builtins

    from logix.integrations import _hf_loss

    real_import = builtins.__import__

    def without_loss_utils(name, *args, **kwargs):
        if name == "transformers.loss.loss_utils":
            raise ImportError("No module named 'transformers.loss.loss_utils'")
        return real_import(name, *args, **kwargs)

    _hf_loss._causal_lm_loss.cache_clear()
    monkeypatch.setattr(builtins, "__import__", without_loss_utils)
    try:
        with pytest.raises(UsageError, match="loss_scale_fn"):
            _hf_loss.shifts_labels(tiny_gpt2())
    finally:
        monkeypatch.undo()
        _hf_loss._causal_lm_loss.cache_clear()
    assert _hf_loss.shifts_labels(tiny_gpt2())


def test_the_trainers_adamw_state_is_kept_for_hessian_optimizer(tmp_path):
    model = make_model("cls")
    run = new_run(tmp_path, model, "cls")
    trainer = train(model, make_data("cls", 8), tmp_path, [LogIXCallback(run)])
    assert "optimizer" in run.influence.available_hessians()
    query = make_data("cls", 2, seed=9)
    kept = influence_of(run, model, query, batch_size=2, hessian="optimizer")["influence"]
    run.add_optimizer_state(trainer.optimizer)  # the same state, added by hand
    again = influence_of(run, model, query, batch_size=2, hessian="optimizer")["influence"]
    assert torch.equal(kept, again) and kept.abs().sum() > 0
    with pytest.raises(UsageError, match="callbacks log none"):  # SOURCE: no checkpoint blocks
        influence_of(run, model, query, batch_size=2, method="source", hessian="optimizer")
    fresh = logix.Attributor(run.project_dir)
    assert "optimizer" in fresh.available_hessians()
