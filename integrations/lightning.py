"""Lightning integration.

During training (nothing about training changes; weights come out bit-identical):

    run = logix.init("lm")
    run.watch(module.model)
    run.add_lora(rank=16)
    run.setup({"grad": ["log"]})
    run.save(True)
    trainer = lightning.Trainer(..., callbacks=[LogIXCallback(run, data_id_fn=lambda b: b["idx"])])
    trainer.fit(module, loader)         # the last epoch's batches logged; then run.finalize()

What a logged row is: the LoGra-projected gradient of the example's SUMMED loss. Lightning
backpropagates `training_step`'s loss divided by `accumulate_grad_batches` (automatic
optimization) and multiplied by the AMP grad scaler; the callback undoes both. What it cannot
see is how your `training_step` reduced the loss: by default it assumes a mean over the examples
of the batch (the usual `F.cross_entropy(logits, y)`) and multiplies by the batch size. A loss
that is a mean over tokens needs `loss_scale_fn=lambda batch: <number of tokens it averages>`.

Data ids: `data_id_fn(batch)` (e.g. dataset indices carried in the batch); by default a stable
hash of each example's content (token ids without padding, or the input's bytes). Masks:
`mask_fn(batch)`; by default `batch["attention_mask"]` for dict batches, else none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from logix.errors import UsageError
from logix.integrations._arguments import BaseLogIXArguments
from logix.integrations._common import (
    EpochChoice, OpenStep, check_epochs, example_ids, extract, finish_training, logs_epoch,
    model_device, query_log,
)
from logix.scheduler import LogIXScheduler
from logix.storage.data_ids import normalize_data_ids

__all__ = ["LogIXCallback", "extract_log", "influence_of", "LogIXArguments", "patch"]

BatchFn = Callable[[Any], Any]


def default_data_ids(batch) -> list:
    """A stable content hash per example of a dict batch (`input_ids`, padding excluded), a
    tuple/list batch (its first element) or a tensor batch."""
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise UsageError(f"Cannot name the examples of a batch with keys {sorted(batch)}: "
                             "pass data_id_fn=lambda batch: <one id per example>.")
        return example_ids(batch["input_ids"], batch.get("attention_mask"))
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    return example_ids(batch)


def default_mask(batch) -> Optional[Tensor]:
    return batch.get("attention_mask") if isinstance(batch, Mapping) else None


class LogIXCallback(Callback):
    """Logs projected per-example gradients of every training batch of `trainer.fit()`.

    Args:
        run: a `logix.Run`. Watch, add_lora, setup and save it before training; if nothing is
            watched yet, the callback watches `model_fn(pl_module)` (default: the module).
        data_id_fn: `fn(batch) -> ids` (a list or a 1-D int tensor, one per example).
        mask_fn: `fn(batch) -> [batch, tokens] mask or None` (padding contributes nothing).
        loss_scale_fn: `fn(batch) -> float`, the number `training_step`'s loss must be
            multiplied by to become the loss summed over examples (default: the batch size,
            for a mean over examples).
        epochs: which training epochs are logged: "last" (default: one row per example, from
            the weights closest to the trained model), "all", or a list of 0-based indices. A
            log keeps one row per data id unless the run's `logging.on_duplicate` is "allow".
            Without max_epochs (training bounded by max_steps), "last" logs every epoch.
        scheduler: a `LogIXScheduler`; each epoch is then one of its passes (max_epochs must
            equal len(scheduler)) and `epochs` is ignored.
        model_fn: `fn(pl_module) -> nn.Module`, the network the callback watches when the run
            watches nothing yet (e.g. `lambda m: m.model` to leave the LightningModule's other
            parts out); default: the LightningModule itself.
        name_filter, type_filter: used when the callback watches the model itself.
    """

    def __init__(self, run, data_id_fn: Optional[BatchFn] = None,
                 mask_fn: Optional[BatchFn] = None, loss_scale_fn: Optional[BatchFn] = None,
                 epochs: EpochChoice = "last", scheduler: Optional[LogIXScheduler] = None,
                 model_fn: Optional[Callable[[nn.Module], nn.Module]] = None, name_filter=None,
                 type_filter=None) -> None:
        self.run = run
        self.epochs = check_epochs(epochs)
        self.data_id_fn = data_id_fn or default_data_ids
        self.mask_fn = mask_fn or default_mask
        self.loss_scale_fn = loss_scale_fn
        self.scheduler = scheduler
        self.model_fn = model_fn
        self.name_filter, self.type_filter = name_filter, type_filter
        self._passes = None
        self._log_epoch = False
        self._step: Optional[OpenStep] = None
        self._backward_done = False

    def on_train_start(self, trainer, pl_module) -> None:
        if not self.run.modules:
            model = self.model_fn(pl_module) if self.model_fn else pl_module
            self.run.watch(model, name_filter=self.name_filter, type_filter=self.type_filter)
        if self.scheduler is not None:
            if trainer.max_epochs != len(self.scheduler):
                raise UsageError(f"LogIXCallback(scheduler=...) runs one scheduler pass per "
                                 f"epoch: set Trainer(max_epochs={len(self.scheduler)}) (got "
                                 f"{trainer.max_epochs}).")
            self._passes = iter(self.scheduler)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._passes is not None:
            next(self._passes, None)
            self._log_epoch = True
        else:
            total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
            self._log_epoch = logs_epoch(self.epochs, trainer.current_epoch, total)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._discard()
        if not self._log_epoch:
            return
        ids = normalize_data_ids(self.data_id_fn(batch))
        mask = self.mask_fn(batch)
        summed = float(self.loss_scale_fn(batch)) if self.loss_scale_fn else float(len(ids))
        self._step = OpenStep(self.run, ids, mask, summed / _backward_factor(trainer, pl_module))
        self._backward_done = False

    def on_after_backward(self, trainer, pl_module) -> None:
        self._backward_done = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._step is None:
            return
        if not self._backward_done:  # training_step returned None: the batch was skipped
            self._discard()
            return
        step, self._step = self._step, None
        step.close()

    def on_train_end(self, trainer, pl_module) -> None:
        self._discard()
        optimizers = getattr(trainer, "optimizers", None) or [None]
        finish_training(self.run, self._passes, optimizers[0])
        self._passes = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._discard()

    def _discard(self) -> None:
        step, self._step = self._step, None
        if step is not None:
            step.discard()


def _backward_factor(trainer, pl_module) -> float:
    """What Lightning multiplies `training_step`'s loss by before backward."""
    factor = 1.0
    if pl_module.automatic_optimization:
        factor /= trainer.accumulate_grad_batches  # every batch, even a short last group
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        factor *= float(scaler.get_scale())
    return factor


# ---------------------------------------------------------------------- post-hoc helpers
def _training_step_loss(module, batch, index) -> Tensor:
    out = module.training_step(batch, index)
    loss = out.get("loss") if isinstance(out, Mapping) else out
    if not isinstance(loss, Tensor):
        raise UsageError("training_step returned no loss; pass loss_fn=lambda module, batch, "
                         "index: loss.")
    return loss


def _posthoc(data_id_fn, mask_fn, loss_scale_fn, loss_fn, module):
    data_id_fn = data_id_fn or default_data_ids
    mask_fn = mask_fn or default_mask
    loss_fn = loss_fn or _training_step_loss

    def describe(batch):
        ids = normalize_data_ids(data_id_fn(batch))
        scale = float(loss_scale_fn(batch)) if loss_scale_fn else float(len(ids))
        return ids, mask_fn(batch), scale

    def loss_of(batch, index):
        return loss_fn(module, batch, index)

    return describe, loss_of


def extract_log(run, module: nn.Module, dataloader, *, data_id_fn: Optional[BatchFn] = None,
                mask_fn: Optional[BatchFn] = None, loss_scale_fn: Optional[BatchFn] = None,
                loss_fn=None, scheduler: Optional[LogIXScheduler] = None, save: bool = True,
                finalize: bool = True) -> None:
    """Log every batch of `dataloader` with a (trained) module, in eval mode, without training.

    The loss is `module.training_step(batch, index)` unless `loss_fn(module, batch, index)` is
    given (use it when training_step calls self.log outside a Trainer loop). With a scheduler,
    its passes run (it sets up, saves and finalizes); otherwise saving is on for the pass
    (`save`), restored after, and the run is finalized (`finalize`).
    """
    describe, loss_of = _posthoc(data_id_fn, mask_fn, loss_scale_fn, loss_fn, module)
    extract(run, module, dataloader, describe, loss_of, scheduler, save, finalize)


def influence_of(run, module: nn.Module, dataloader, *, data_id_fn: Optional[BatchFn] = None,
                 mask_fn: Optional[BatchFn] = None, loss_scale_fn: Optional[BatchFn] = None,
                 loss_fn=None, **influence_kwargs) -> dict:
    """Score every example of `dataloader` against the saved training log (queries stay in
    memory). Returns `run.compute_influence_all`'s dict: "src_ids", "tgt_ids", "influence"
    [n_query, n_train]; a positive score means training on that example lowers the query's
    loss."""
    describe, loss_of = _posthoc(data_id_fn, mask_fn, loss_scale_fn, loss_fn, module)
    return run.compute_influence_all(query_log(run, module, dataloader, describe, loss_of),
                                     **influence_kwargs)


# ---------------------------------------------------------------------- old LogIX API
@dataclass
class LogIXArguments(BaseLogIXArguments):
    """Old LogIX's `logix.lightning.LogIXArguments` (same field names)."""

    model_key: str = field(default="model", metadata={
        "help": "Attribute of the LightningModule holding the network to watch."})


def patch(module_cls, trainer_cls, logix_args: LogIXArguments,
          data_id_extractor: Optional[BatchFn] = None, mask_extractor: Optional[BatchFn] = None):
    """Old LogIX's entry point: returns (PatchedModule, PatchedTrainer).

    PatchedModule watches `getattr(module, logix_args.model_key)` when built.
    PatchedTrainer keeps every Trainer argument as given (old LogIX forced logger, checkpointing
    and validation off) and adds `extract_log(model, dataloader)` (post-hoc logging with the
    scheduler the arguments describe), `influence(model, dataloader)` and `self_influence(...)`.
    For logging during real training, pass `LogIXCallback` to a plain Trainer instead.
    The run (`logix.init(logix_args.project, config=logix_args.config)`) is created when the
    first patched module or trainer is built, not by `patch` itself.
    """
    made = []

    def the_run():
        if not made:
            import logix

            made.append(logix.init(project=logix_args.project, config=logix_args.config))
        return made[0]

    options = dict(data_id_fn=data_id_extractor, mask_fn=mask_extractor)

    class PatchedModule(module_cls):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            run = self.logix = the_run()
            self.logix_args = logix_args
            run.watch(getattr(self, logix_args.model_key),
                      name_filter=logix_args.name_filter or None,
                      type_filter=logix_args.type_filter or None)
            if logix_args.initialize_from_log:
                run.initialize_from_log()

    class PatchedTrainer(trainer_cls):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.logix, self.logix_args = the_run(), logix_args

        def extract_log(self, model, train_dataloaders=None, datamodule=None) -> None:
            logix_args.mode = "log"
            run = self.logix
            scheduler = LogIXScheduler(run, lora=logix_args.lora_init(run),
                                       hessian=logix_args.hessian, save=logix_args.save)
            loader = train_dataloaders if datamodule is None else datamodule.train_dataloader()
            with _on_device(model, self.strategy.root_device):
                extract_log(run, model, loader, scheduler=scheduler, **options)

        def influence(self, model, train_dataloaders=None, datamodule=None) -> dict:
            logix_args.mode = "influence"
            loader = train_dataloaders if datamodule is None else datamodule.train_dataloader()
            with _on_device(model, self.strategy.root_device):
                return influence_of(self.logix, model, loader, **options,
                                    **logix_args.influence_kwargs())

        def self_influence(self, model, train_dataloaders=None, datamodule=None):
            logix_args.mode = "self_influence"
            loader = train_dataloaders if datamodule is None else datamodule.train_dataloader()
            describe, loss_of = _posthoc(data_id_extractor, mask_extractor, None, None, model)
            with _on_device(model, self.strategy.root_device):
                log = query_log(self.logix, model, loader, describe, loss_of)
            return self.logix.compute_self_influence(log)

    PatchedModule.__name__ = PatchedModule.__qualname__ = f"LogIX{module_cls.__name__}"
    PatchedTrainer.__name__ = PatchedTrainer.__qualname__ = f"LogIX{trainer_cls.__name__}"
    return PatchedModule, PatchedTrainer


@contextlib.contextmanager
def _on_device(model: nn.Module, device: torch.device):
    """Run post-hoc work where the Trainer would, then put the module back."""
    before = model_device(model)
    model.to(device)
    try:
        yield
    finally:
        model.to(before)
