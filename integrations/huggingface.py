"""Hugging Face `Trainer` integration.

During training (nothing about training changes; weights come out bit-identical):

    run = logix.init("sst2")
    run.watch(model)                # every Linear, Conv1D and Embedding (name_filter= for fewer)
    run.add_lora(rank=16)
    run.setup({"grad": ["log"]})
    run.save(True)                  # without it nothing is written (a warning at train begin)
    trainer = Trainer(model, args, train_dataset=train, callbacks=[LogIXCallback(run)])
    trainer.train()                 # the last epoch's micro-batches logged; then run.finalize()

Position embeddings that see `[1, T]` position ids shared by the batch are expanded to the batch
inside the hooks, so the whole model can be watched. After training the run is finalized: call
`run.eval()` before a hand-made query (`influence_of` does it for you); a step with saving still
on is refused rather than appended to the training log.

After training, with a trained model (post-hoc):

    extract_log(run, model, train, batch_size=16)          # log a dataset
    result = influence_of(run, model, test, batch_size=16)  # queries vs the saved log
    result["influence"]   # [n_test, n_train]; positive: training on the example helps the query

What a logged row is: the LoGra-projected gradient of the example's SUMMED loss (summed over its
tokens for a causal LM, its own loss for a classifier), whatever the Trainer backpropagates. The
explicit way to say how the Trainer's loss relates to that sum, and the first choice, is
`loss_scale_fn(inputs) -> n` (the backpropagated loss times n is the summed loss). Without it
the callback infers n from how transformers reduces losses today (`_hf_loss.py`, the one module
that reads transformers' internals): a mean over the micro-batch or over the tokens of all
accumulated micro-batches (`num_items_in_batch`), divided by the accumulation steps, times the
fp16 grad scaler. Either way n is checked against the gradient that actually reaches the model's
loss, and wrong numbers are refused, not logged: a loss the callback cannot see
(`compute_loss_func`, label smoothing, a custom `compute_loss`) needs `loss_scale_fn`.

Data ids: by default a stable hash of each example's real tokens (`input_ids` where
`attention_mask` is 1), so an example keeps its id across epochs and paddings. To use your own
ids (e.g. dataset indices), put them in a column and pass `data_id_column="idx"`. The Trainer
drops columns its model's forward does not name, so also set
`TrainingArguments(remove_unused_columns=False)` and keep only model inputs and the id column in
the dataset (every column then reaches the collator). The callback removes the id column from
the model's inputs during `trainer.train()`; datasets you `trainer.evaluate()` outside training
must not carry it.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from logix.errors import ConfigError, UsageError
from logix.integrations._arguments import BaseLogIXArguments
from logix.integrations._common import (
    Described, EpochChoice, OpenStep, check_epochs, example_ids, extract, finish_training,
    logs_epoch, query_log,
)
from logix.integrations._hf_loss import (
    IGNORE_INDEX, LABELS, count_items, forward_arguments, honours_num_items, loss_of, summed_loss,
)
from logix.scheduler import LogIXScheduler

__all__ = ["LogIXCallback", "extract_log", "influence_of", "LogIXArguments", "patch_trainer"]

_NUM_ITEMS = "num_items_in_batch"
# Relative tolerance of the check that the loss factor we assumed is the one autograd applied.
_FACTOR_RTOL = 1e-3

LossScaleFn = Callable[[Dict[str, Any]], float]


class LogIXCallback(TrainerCallback):
    """Logs projected per-example gradients of every training micro-batch of `trainer.train()`.

    Args:
        run: a `logix.Run`. Watch, add_lora, setup and save it as you like before training; if
            nothing is watched yet, the callback watches the Trainer's model (with the filters).
        data_id_column: batch key holding one id per example (see the module docstring), or
            None to hash each example's real tokens.
        mask_column: batch key of the [batch, tokens] mask passed to `run.start` (padding tokens
            contribute nothing), or None.
        input_column: batch key of the token ids hashed into data ids.
        loss_scale_fn: `fn(model_inputs) -> float`, the number to multiply the backpropagated
            loss by to get the loss summed over examples. Needed only when the model's forward
            does not return the loss the Trainer uses; it then replaces the automatic factor.
        epochs: which training epochs are logged: "last" (default: one row per example, from
            the weights closest to the trained model), "all", or a list of 0-based indices. A
            log keeps one row per data id unless the run's `logging.on_duplicate` is "allow".
            When the Trainer cannot know its last epoch (an iterable dataset), "last" logs all.
        scheduler: a `LogIXScheduler`; each training epoch is then one of its passes
            (num_train_epochs must equal len(scheduler)) and `epochs` is ignored.
        name_filter, type_filter: used when the callback watches the model itself.
    """

    def __init__(self, run, data_id_column: Optional[str] = None,
                 mask_column: Optional[str] = "attention_mask", input_column: str = "input_ids",
                 loss_scale_fn: Optional[LossScaleFn] = None, epochs: EpochChoice = "last",
                 scheduler: Optional[LogIXScheduler] = None, name_filter=None,
                 type_filter=None) -> None:
        self.run = run
        self.epochs = check_epochs(epochs)
        self.data_id_column = data_id_column
        self.mask_column = mask_column
        self.input_column = input_column
        self.loss_scale_fn = loss_scale_fn
        self.scheduler = scheduler
        self.name_filter, self.type_filter = name_filter, type_filter
        self._model: Optional[nn.Module] = None
        self._args = None
        self._optimizer = None
        self._handles: list = []
        self._passes = None
        self._log_epoch = False    # this epoch is logged
        self._armed = False        # inside an optimizer step: on_step_begin .. on_step_end
        self._step: Optional[OpenStep] = None  # the open micro-batch, closed after backward
        self._micro = 0            # micro-batches started in this epoch
        self._steps_in_epoch: Optional[int] = None
        self._expect: Optional[_Expected] = None
        self._seen_factor: Optional[Tensor] = None  # d(backpropagated loss) / d(model loss)
        self._loss_hooked = False
        self._denominator_checked = False

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise UsageError("LogIXCallback got no model from the Trainer.")
        self._check_arguments(args, model)
        self._model, self._args, self._optimizer = model, args, optimizer
        if not self.run.modules:
            self.run.watch(model, name_filter=self.name_filter, type_filter=self.type_filter)
        if self.scheduler is not None:
            epochs = math.ceil(args.num_train_epochs)
            if args.max_steps > 0 or epochs != len(self.scheduler):
                raise UsageError(
                    f"LogIXCallback(scheduler=...) runs one scheduler pass per epoch: set "
                    f"TrainingArguments(num_train_epochs={len(self.scheduler)}) and no max_steps "
                    f"(got num_train_epochs={args.num_train_epochs}, max_steps={args.max_steps}).")
            self._passes = iter(self.scheduler)
        self._remove_hooks()
        self._handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, with_kwargs=True),
        ]

    def _check_arguments(self, args, model: nn.Module) -> None:
        """Settings that would fail (or log nothing) only at the first logged step, which
        with epochs="last" comes after every earlier epoch of training."""
        if getattr(args, "label_smoothing_factor", 0) > 0 and self.loss_scale_fn is None:
            raise UsageError(
                f"TrainingArguments(label_smoothing_factor={args.label_smoothing_factor}): the "
                "Trainer then computes a smoothed loss outside the model, so LogIXCallback cannot "
                "tell how it was reduced. Train with label_smoothing_factor=0, or pass "
                "loss_scale_fn=lambda inputs: <number the Trainer's loss must be multiplied by "
                "to become the loss summed over examples>.")
        column = self.data_id_column
        if column is not None and getattr(args, "remove_unused_columns", False) \
                and column not in forward_arguments(model) | {"label", "label_ids"} \
                | set(getattr(args, "label_names", None) or []):
            raise UsageError(
                f"data_id_column={column!r} is not an argument of the model's forward, so the "
                "Trainer drops it from every batch: set TrainingArguments("
                "remove_unused_columns=False), or pass data_id_column=None to name examples by a "
                "hash of their tokens.")
        saved_by_scheduler = self.scheduler is not None and self.scheduler.save == "grad"
        if self.run.capture_spec.log_grad and not self.run.saving and not saved_by_scheduler:
            warnings.warn("LogIXCallback: run.save(True) was not called, so no training row will "
                          "be written (only the last micro-batch stays in memory). Call "
                          "run.save(True) before trainer.train() to log the training set.",
                          stacklevel=2)

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self._micro = 0
        self._steps_in_epoch = _length(train_dataloader)
        if self._passes is not None:
            next(self._passes, None)
            self._log_epoch = True
        else:
            total = state.num_train_epochs if state.num_train_epochs < sys.maxsize else None
            self._log_epoch = logs_epoch(self.epochs, math.floor(state.epoch or 0), total)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self._armed = self._log_epoch
        if optimizer is not None:
            self._optimizer = optimizer

    def on_substep_end(self, args, state, control, **kwargs):
        self._close()

    def on_step_end(self, args, state, control, **kwargs):
        self._close()
        self._armed = False

    def on_train_end(self, args, state, control, **kwargs):
        self._close()
        self._armed = False
        self._remove_hooks()
        finish_training(self.run, self._passes, self._optimizer)
        self._passes = None

    # ------------------------------------------------------------------ model hooks
    def _before_forward(self, module, args, kwargs):
        ids = None
        changed = self.data_id_column is not None and self.data_id_column in kwargs
        if changed:
            kwargs = dict(kwargs)
            ids = kwargs.pop(self.data_id_column)
        if self._armed and self._step is None and module.training and torch.is_grad_enabled():
            try:
                self._start(kwargs, ids, args)
            except BaseException:
                self._remove_hooks()  # the Trainer stops: leave nothing attached to the model
                raise
        return (args, kwargs) if changed else None

    def _after_forward(self, module, args, kwargs, output):
        if self._step is None or self._loss_hooked:
            return
        self._loss_hooked = True
        loss = loss_of(output)
        if not isinstance(loss, Tensor) or not loss.requires_grad or self._expect is None:
            return
        loss.register_hook(self._record_factor)
        if self._expect.ambiguous and not self._denominator_checked:
            self._check_denominator(kwargs, output, loss)

    def _record_factor(self, grad: Tensor) -> None:
        self._seen_factor = grad.detach()  # read at _close, not here: no device sync in backward

    # ------------------------------------------------------------------ per micro-batch
    def _start(self, kwargs: dict, ids, args: tuple = ()) -> None:
        if self.data_id_column is not None and ids is None:
            raise UsageError(
                f"data_id_column={self.data_id_column!r} is not in the batch the model gets "
                f"(keys: {sorted(kwargs)}). The Trainer drops columns the model's forward does not "
                "name: set TrainingArguments(remove_unused_columns=False), or pass "
                "data_id_column=None to name examples by a hash of their tokens.")
        if ids is None:
            inputs = kwargs.get(self.input_column)
            if inputs is None and args and isinstance(args[0], Tensor):
                inputs = args[0]  # model(input_ids, ...) called positionally
            if inputs is None:
                raise UsageError(f"input_column={self.input_column!r} is not in the batch (keys: "
                                 f"{sorted(kwargs)}); pass input_column= or data_id_column=.")
            ids = example_ids(inputs, kwargs.get(self.mask_column) if self.mask_column else None)
        mask = kwargs.get(self.mask_column) if self.mask_column else None
        scale = self._scale(kwargs)
        self._step = OpenStep(self.run, ids, mask, scale)
        self._loss_hooked, self._seen_factor = False, None
        self._micro += 1

    def _scale(self, kwargs: dict) -> float:
        """The factor that turns this micro-batch's logged gradients into gradients of the loss
        summed over its examples: denominator of the model's mean / factor the Trainer applies."""
        if self.loss_scale_fn is not None:
            self._expect = None
            return float(self.loss_scale_fn(kwargs))
        if kwargs.get(LABELS) is None:
            raise UsageError(
                "LogIXCallback cannot tell how this loss was reduced: the model got no `labels` "
                "(a compute_loss_func, label smoothing or a custom compute_loss computes it "
                "outside the model). Pass loss_scale_fn=lambda inputs: <number the Trainer's "
                "loss must be multiplied by to become the loss summed over examples>.")
        local = count_items(self._model, kwargs)
        total = kwargs.get(_NUM_ITEMS)
        if total is not None:
            # The Trainer passed num_items_in_batch (the items of all accumulated micro-batches)
            # and treats the loss as already scaled for accumulation.
            total = float(total)
            denominator = total if honours_num_items(self._model) else local
            factor = self._device_factor()
            ambiguous = not math.isclose(total, local)
        else:
            denominator = local
            factor = 1.0 / self._accumulation_steps()
            ambiguous = False
        factor *= self._grad_scaler_scale()
        self._expect = _Expected(factor, denominator, ambiguous)
        return denominator / factor

    def _accumulation_steps(self) -> int:
        """Micro-batches in the current optimizer step (the epoch's last step may hold fewer)."""
        steps = self._args.gradient_accumulation_steps
        n = self._steps_in_epoch
        if steps == 1 or not n:
            return steps
        last_start = (n - 1) // steps * steps
        return n - last_start if self._micro >= last_start else steps

    def _device_factor(self) -> float:
        args = self._args
        if not getattr(args, "average_tokens_across_devices", False):
            return 1.0
        return float(args.n_gpu) if args.n_gpu > 1 else float(args.world_size)

    def _grad_scaler_scale(self) -> float:
        scaler = getattr(self._optimizer, "scaler", None)
        if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
            return 1.0
        return float(scaler.get_scale())

    def _check_denominator(self, kwargs: dict, output, loss: Tensor) -> None:
        summed = summed_loss(self._model, kwargs, output)
        value = float(loss.detach())
        if summed is None or value == 0.0:
            return
        measured = summed / value
        if not math.isclose(measured, self._expect.denominator, rel_tol=_FACTOR_RTOL):
            self._fail(f"the model's loss is its summed loss divided by {measured:.6g}, but "
                       f"LogIX expected {self._expect.denominator:.6g}")
        self._denominator_checked = True

    def _close(self) -> None:
        if self._step is None:
            return
        expect, seen = self._expect, self._seen_factor
        if seen is not None:
            seen = float(seen.float().sum())
        if expect is not None and seen is not None \
                and not math.isclose(seen, expect.factor, rel_tol=_FACTOR_RTOL):
            self._fail(f"the Trainer multiplied the model's loss by {seen:.6g} before backward, "
                       f"but LogIX expected {expect.factor:.6g}")
        step, self._step = self._step, None
        step.close()

    def _fail(self, what: str) -> None:
        step, self._step, self._armed = self._step, None, False
        self._remove_hooks()
        if step is not None:
            step.discard()  # detach without logging wrong numbers
        raise UsageError(f"LogIXCallback: {what}, so the logged gradients would be wrongly "
                         "scaled. Pass loss_scale_fn=lambda inputs: <number the backpropagated "
                         "loss must be multiplied by to become the loss summed over examples>.")

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class _Expected:
    """What the callback assumed for the open micro-batch, checked during backward."""

    __slots__ = ("factor", "denominator", "ambiguous")

    def __init__(self, factor: float, denominator: float, ambiguous: bool) -> None:
        self.factor, self.denominator, self.ambiguous = factor, denominator, ambiguous


def _length(loader) -> Optional[int]:
    try:
        return len(loader)
    except TypeError:
        return None


# ---------------------------------------------------------------------- post-hoc helpers
def _loader(dataset, batch_size: int, collate_fn):
    from torch.utils.data import DataLoader

    if isinstance(dataset, DataLoader):
        return dataset
    if collate_fn is None:
        from transformers import default_data_collator as collate_fn
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)


def _describer(model: nn.Module, data_id_column, mask_column, input_column,
               loss_scale_fn) -> Callable[[dict], Described]:
    def describe(batch: dict) -> Described:
        if data_id_column is not None:
            if data_id_column not in batch:
                raise UsageError(f"data_id_column={data_id_column!r} is not in the batch (keys: "
                                 f"{sorted(batch)}).")
            ids = batch.pop(data_id_column)
        else:
            ids = example_ids(batch[input_column], batch.get(mask_column) if mask_column else None)
        mask = batch.get(mask_column) if mask_column else None
        if loss_scale_fn is not None:
            scale = float(loss_scale_fn(batch))
        elif batch.get(LABELS) is None:
            raise UsageError("The batch has no `labels`, so the model computes no loss. Add "
                             "labels, or pass loss_fn= and loss_scale_fn=.")
        else:
            scale = count_items(model, batch)  # the model returns a mean over its items
        return ids, mask, scale

    return describe


def _default_loss(model: nn.Module, batch: dict) -> Tensor:
    loss = loss_of(model(**batch))
    if loss is None:
        raise UsageError("The model returned no loss; pass loss_fn=lambda model, batch: loss.")
    return loss


def extract_log(run, model: nn.Module, dataset, *, batch_size: int = 16, collate_fn=None,
                data_id_column: Optional[str] = None, mask_column: Optional[str] = "attention_mask",
                input_column: str = "input_ids", loss_fn=None,
                loss_scale_fn: Optional[LossScaleFn] = None,
                scheduler: Optional[LogIXScheduler] = None, save: bool = True,
                finalize: bool = True) -> None:
    """Log every example of `dataset` with a (trained) model, in eval mode, without training.

    Args:
        dataset: a map-style dataset of dicts (or a DataLoader), with `labels`.
        collate_fn: batches examples (default: transformers.default_data_collator).
        loss_fn: `fn(model, batch) -> loss`; default: the model's own (mean) loss.
        loss_scale_fn: `fn(batch) -> float` turning `loss_fn`'s loss into the summed loss;
            default: the number of items the model's mean divides by.
        scheduler: a LogIXScheduler for multi-pass logging (PCA, statistics); it sets up,
            saves and finalizes. Without one, the run's own setup is used, saving is on for the
            pass (`save`) and restored after, and the run is finalized (`finalize`).
    """
    describe = _describer(model, data_id_column, mask_column, input_column, loss_scale_fn)
    loss_fn = loss_fn or _default_loss
    extract(run, model, _loader(dataset, batch_size, collate_fn), describe,
            lambda batch, _: loss_fn(model, batch), scheduler, save, finalize)


def influence_of(run, model: nn.Module, eval_dataset, *, batch_size: int = 16, collate_fn=None,
                 data_id_column: Optional[str] = None,
                 mask_column: Optional[str] = "attention_mask", input_column: str = "input_ids",
                 loss_fn=None, loss_scale_fn: Optional[LossScaleFn] = None,
                 **influence_kwargs) -> dict:
    """Score every example of `eval_dataset` against the saved training log.

    Query gradients are computed in eval mode and kept in memory (nothing is written, no
    statistics change). If the run watches nothing yet (a new process), the model is watched
    and the log's projections and statistics are loaded. Extra keyword arguments go to
    `run.compute_influence_all` (mode, damping, ...). Returns its dict: "src_ids" (queries),
    "tgt_ids" (training examples), "influence" [n_query, n_train]; a positive score means
    training on that example lowers the query's loss.
    """
    describe = _describer(model, data_id_column, mask_column, input_column, loss_scale_fn)
    loss_fn = loss_fn or _default_loss
    test_log = query_log(run, model, _loader(eval_dataset, batch_size, collate_fn), describe,
                         lambda batch, _: loss_fn(model, batch))
    return run.compute_influence_all(test_log, **influence_kwargs)


# ---------------------------------------------------------------------- old LogIX API
@dataclass
class LogIXArguments(BaseLogIXArguments):
    """Old LogIX's `logix.huggingface.LogIXArguments` (same field names)."""

    input_key: str = field(default="input_ids", metadata={"help": "Batch key of token ids."})
    label_key: str = field(default=LABELS, metadata={"help": "Batch key of labels."})
    attention_key: str = field(default="attention_mask",
                               metadata={"help": "Batch key of the attention mask."})
    data_id: str = field(default="detokenize", metadata={
        "help": "How examples are named: 'detokenize' (the decoded text; needs the Trainer's "
                "processing_class) or 'hash' (a hash of the real tokens)."})
    ignore_idx: int = field(default=-100, metadata={"help": "Label ignored by the loss."})
    influence_groups: Optional[List[str]] = field(
        default=None, metadata={"help": "Module groups scored separately (if supported)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data_id not in ("detokenize", "hash"):
            raise ConfigError(f"LogIXArguments.data_id={self.data_id!r}; allowed: "
                              "['detokenize', 'hash'].")
        if self.label_key != LABELS or self.ignore_idx != IGNORE_INDEX:
            raise ConfigError("LogIXArguments: label_key must be 'labels' and ignore_idx -100, "
                              "as in Hugging Face models' own losses.")


def patch_trainer(TrainerClass):
    """Old LogIX's entry point: a subclass of `TrainerClass` whose first argument is a
    `LogIXArguments` and that adds `extract_log()`, `influence()` and `self_influence()`.

    Unlike old LogIX it never edits the TrainingArguments and never trains with a dummy
    optimizer: `extract_log()` logs the train dataset post-hoc with the current model (eval
    mode) and `influence()` scores a dataset against the saved log. For logging during real
    training use `LogIXCallback`.
    """
    import logix

    class PatchedTrainer(TrainerClass):
        def __init__(self, logix_args: LogIXArguments, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.logix_args = logix_args
            self.logix = logix.init(project=logix_args.project, config=logix_args.config)
            self.logix.watch(self.model, name_filter=logix_args.name_filter or None,
                             type_filter=logix_args.type_filter or None)
            if logix_args.initialize_from_log:
                self.logix.initialize_from_log()

        def _options(self) -> dict:
            a = self.logix_args
            options = dict(batch_size=a.log_batch_size, mask_column=a.attention_key,
                           input_column=a.input_key, collate_fn=self.data_collator)
            if a.data_id == "detokenize":
                if self.processing_class is None:
                    raise UsageError("LogIXArguments(data_id='detokenize') needs the Trainer's "
                                     "processing_class (tokenizer); or use data_id='hash'.")
                options["data_id_column"] = _DECODED
                options["collate_fn"] = _with_decoded_ids(self.data_collator,
                                                          self.processing_class, a.input_key)
            return options

        def extract_log(self, dataset=None) -> None:
            a = self.logix_args
            self.logix_args.mode = "log"
            scheduler = LogIXScheduler(self.logix, lora=a.lora_init(self.logix),
                                       hessian=a.hessian, save=a.save)
            extract_log(self.logix, self.model, dataset or self.train_dataset,
                        scheduler=scheduler, **self._options())

        def influence(self, dataset=None) -> dict:
            """Scores of `dataset` (default: this Trainer's train_dataset, as in old LogIX)
            against the saved log."""
            self.logix_args.mode = "influence"
            return influence_of(self.logix, self.model, dataset or self.train_dataset,
                                **self._options(), **self.logix_args.influence_kwargs())

        def self_influence(self, dataset=None):
            self.logix_args.mode = "self_influence"
            options = self._options()
            describe = _describer(self.model, options.get("data_id_column"),
                                  options["mask_column"], options["input_column"], None)
            loader = _loader(dataset or self.train_dataset, options["batch_size"],
                             options["collate_fn"])
            log = query_log(self.logix, self.model, loader, describe,
                            lambda batch, _: _default_loss(self.model, batch))
            return self.logix.compute_self_influence(log)

    PatchedTrainer.__name__ = PatchedTrainer.__qualname__ = f"LogIX{TrainerClass.__name__}"
    return PatchedTrainer


_DECODED = "_logix_decoded_id"


def _with_decoded_ids(collate_fn, tokenizer, input_key: str):
    """Old LogIX's default data ids: each example's decoded text."""
    from transformers import default_data_collator

    collate_fn = collate_fn or default_data_collator

    def collate(features):
        batch = dict(collate_fn(features))
        batch[_DECODED] = tokenizer.batch_decode(batch[input_key], skip_special_tokens=True)
        return batch

    return collate
