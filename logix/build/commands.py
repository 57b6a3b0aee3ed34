"""`logix build` and `logix score`: a training log of a whole dataset, and queries scored against
it (or against a dataset on the fly), driving a Run the way a user's loop would.

    cfg = BuildConfig(project="logs/code", model="path/to/model", data="train.jsonl")
    build(cfg)                                  # <project>/build.yaml, rows, EK-FAC, texts
    score("logs/code", queries="queries.jsonl", aggregate="mean")   # a score file `logix top`
    score(None, queries="queries.jsonl", train="train.jsonl", cfg=cfg, out="s.safetensors")

The build saves every choice in `<project>/build.yaml` first; `BuildConfig.load` of it replays
the same build, and rerunning on the same project logs only the ids not logged yet.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import yaml
from torch import Tensor, nn

import logix
from logix.errors import ConfigError, UsageError
from logix.influence import curvature
from logix.progress import track
from logix.storage.format import DTYPES
from logix.storage.manifest import load_optional
from logix.storage.reader import LogReader
from logix.storage.scores import save_scores
from logix.tracking.frozen import frozen

from logix.integrations._common import (eval_mode, log_batches, model_device, query_log,
                                        to_device)

from .data import (FORMATS, ORDERS, Columns, Example, batches, make_examples, read_rows,
                       summed_nll)

BUILD_FILE = "build.yaml"
AGGREGATES = ("none", "mean", "sum", "max")


@dataclass
class BuildConfig:
    """Every choice of `logix build` (what `<project>/build.yaml` holds)."""

    project: str = field(default="", metadata={"help": "the project folder <root_dir>/<name>"})
    model: str = field(default="", metadata={"help": "a model folder (from_pretrained) or a "
                                                     "config.json (random weights, seeded)"})
    tokenizer: Optional[str] = field(default=None, metadata={"help": "a tokenizer folder "
                                                                     "(default: the model's)"})
    data: str = field(default="", metadata={"help": "jsonl, csv, parquet or save_to_disk"})
    format: str = field(default="auto", metadata={"help": "auto | text | completion | chat"})
    text_column: str = "text"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    id_column: Optional[str] = None
    split: Optional[str] = None
    limit: Optional[int] = field(default=None, metadata={"help": "the first N rows only"})
    max_length: int = field(default=512, metadata={"help": "tokens per example (window)"})
    batch_size: int = field(default=8, metadata={"help": "examples per batch"})
    batch_tokens: Optional[int] = field(default=None, metadata={
        "help": "padded tokens per batch (overrides batch_size)"})
    batching: str = field(default="sorted", metadata={"help": "sorted | greedy"})
    rank: int = field(default=16, metadata={"help": "LoGra rank (0: no projection)"})
    hessian: str = field(default="ekfac", metadata={"help": "curvature whose statistics are "
                                                            "collected"})
    dtype: str = "float32"
    name_filter: Optional[List[str]] = None
    seed: int = 0
    device: Optional[str] = None

    # Choices that change what a row is: a resumed build must keep them.
    ROW_FIELDS = ("model", "tokenizer", "data", "format", "text_column", "prompt_column",
                  "completion_column", "messages_column", "id_column", "split", "max_length",
                  "rank", "hessian", "dtype", "name_filter", "seed")

    def __post_init__(self) -> None:
        for name in ("max_length", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("batch_tokens", "limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {value!r}.")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2, got {self.max_length}.")
        if not isinstance(self.rank, int) or self.rank < 0:
            raise ConfigError(f"rank must be 0 (no projection) or positive, got {self.rank!r}.")
        if self.format not in FORMATS:
            raise ConfigError(f"format={self.format!r}; allowed: {', '.join(FORMATS)}.")
        if self.batching not in ORDERS:
            raise ConfigError(f"batching={self.batching!r}; allowed: {', '.join(ORDERS)}.")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}; allowed: {', '.join(DTYPES)}.")
        curvature.check(self.hessian)
        if isinstance(self.name_filter, str):
            self.name_filter = [self.name_filter]

    @property
    def columns(self) -> Columns:
        return Columns(self.format, self.text_column, self.prompt_column, self.completion_column,
                       self.messages_column, self.id_column)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "BuildConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"Unknown build settings {unknown}; known: {sorted(known)}.")
        return cls(**values)

    @classmethod
    def load(cls, path: str, **overrides: Any) -> "BuildConfig":
        """A saved build.yaml (a project folder names its own), then `overrides` (None: not
        given)."""
        if os.path.isdir(path):
            path = os.path.join(path, BUILD_FILE)
        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"Cannot read the build config {path!r}: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path!r} must hold a mapping of build settings.")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)

    def save(self, path: str) -> str:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)
        os.replace(tmp, path)
        return path

    def absolute(self) -> "BuildConfig":
        """The same config with its paths absolute (replayable from any folder)."""
        paths = {k: os.path.abspath(getattr(self, k)) for k in ("project", "model", "tokenizer",
                                                                "data") if getattr(self, k)}
        return dataclasses.replace(self, **paths)


@dataclass
class BuildReport:
    project_dir: str
    examples: int  # examples in the dataset (windows, rows)
    logged: int  # examples logged by this build
    skipped: int  # examples already in the log (resumed)
    batches: int
    tokens: int  # real tokens of the logged examples
    seconds: float  # in all
    prepare_seconds: float = 0.0  # model, tokenizer, reading and tokenizing the data
    log_seconds: float = 0.0  # the logging pass
    finalize_seconds: float = 0.0  # flush, statistics, curvature fit


# --------------------------------------------------------------------------- loading
def load_model(path: str, seed: int = 0, device: Optional[str] = None) -> nn.Module:
    """A causal LM: `from_pretrained` of a local folder with weights, or random weights (seeded)
    from a Hugging Face config.json (or a folder holding only one). Nothing is downloaded."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise UsageError("Loading a model needs transformers: pip install "
                         "'logix[huggingface]'.") from None
    if not os.path.exists(path):
        raise UsageError(f"The model {path!r} does not exist: pass a model folder "
                         "(save_pretrained) or a config.json.")
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    weights = os.path.isdir(path) and any(
        f.endswith((".safetensors", ".bin")) and ("model" in f)
        for f in os.listdir(path))
    if weights:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                     attn_implementation="eager")
    else:
        config_path = os.path.join(folder, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(config_path):
            raise UsageError(f"{path!r} has neither weights nor a config.json.")
        _check_config(config_path)
        config = AutoConfig.from_pretrained(config_path, local_files_only=True)
        config._attn_implementation = "eager"
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device)


def _check_config(path: str) -> None:
    """A readable JSON object with a `model_type`, or a UsageError saying which it is not."""
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the model config {path!r}: {e}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise UsageError(f"{path!r} has no 'model_type': pass a Hugging Face config.json.")


def load_tokenizer(path: str):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UsageError("logix build / score need transformers: pip install "
                         "'logix[huggingface]'.") from None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UsageError(f"Cannot load a tokenizer from {path!r} ({e}): pass --tokenizer, a "
                         "folder written by tokenizer.save_pretrained.") from None


def pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def _examples(path: str, cfg: BuildConfig, tokenizer, prefix: str = "",
              columns: Optional[Columns] = None) -> List[Example]:
    rows = read_rows(path, cfg.split, cfg.limit if not prefix else None)
    if not rows:
        raise UsageError(f"The dataset {path!r} has no rows.")
    return make_examples(rows, tokenizer, columns or cfg.columns, cfg.max_length, prefix)


def _setup_spec(hessian: str) -> Dict[str, List[str]]:
    spec = curvature.get(hessian).setup_spec()
    spec["grad"] = ["log", *spec.get("grad", [])]
    return spec


def _init(project_dir: str, cfg: BuildConfig, on_duplicate: str = "skip"):
    project_dir = os.path.abspath(project_dir)
    return logix.init(os.path.basename(project_dir), root_dir=os.path.dirname(project_dir),
                      seed=cfg.seed, log_dtype=cfg.dtype,
                      logging={"on_duplicate": on_duplicate})


def _watch(run, model: nn.Module, cfg: BuildConfig) -> None:
    run.watch(model, name_filter=cfg.name_filter)
    if cfg.rank:
        run.add_lora(rank=cfg.rank)


def _describe(batch: Dict[str, Any]):
    return batch["ids"], batch["attention_mask"], 1.0  # the loss is summed: scale 1


def _loss(model: nn.Module):
    return lambda batch, index: summed_nll(model, batch)


# --------------------------------------------------------------------------- build
def build(cfg: BuildConfig, progress: bool = True) -> BuildReport:
    """Log every example of `cfg.data` into `cfg.project` (frozen: no weight gradients), with
    the statistics of `cfg.hessian`, the examples' texts described, then finalize. Examples
    whose ids the log already holds are skipped (a resumed build)."""
    if not cfg.project:
        raise UsageError("A build needs a project folder (<root_dir>/<name>).")
    cfg = cfg.absolute()
    project_dir = cfg.project
    saved = os.path.join(project_dir, BUILD_FILE)
    if os.path.isfile(saved):
        before = BuildConfig.load(saved)
        changed = [k for k in BuildConfig.ROW_FIELDS if getattr(before, k) != getattr(cfg, k)]
        if changed:
            what = ", ".join(f"{k}: {getattr(before, k)!r}, now {getattr(cfg, k)!r}"
                             for k in changed)
            raise UsageError(f"{project_dir!r} was built with other settings ({what}); resume "
                             f"with the same settings (logix build --config {saved}) or build "
                             "into a new project.")
    os.makedirs(project_dir, exist_ok=True)
    cfg.save(saved)  # first: a build that stops can be replayed and resumed
    clock = time.perf_counter()
    model = load_model(cfg.model, cfg.seed, cfg.device)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    examples = _examples(cfg.data, cfg, tokenizer)
    logged = set(map(str, LogReader(project_dir, verify=False).data_ids())) \
        if load_optional(project_dir) is not None else set()
    todo = [e for e in examples if e.id not in logged]
    report = BuildReport(project_dir, len(examples), len(todo), len(examples) - len(todo), 0,
                         sum(len(e) for e in todo), 0.0)
    report.prepare_seconds = time.perf_counter() - clock
    if not todo:
        report.seconds = time.perf_counter() - clock
        return report
    run = _init(project_dir, cfg)
    _watch(run, model, cfg)
    run.setup(_setup_spec(cfg.hessian))
    run.declare_curvature(cfg.hessian)
    run.describe([e.id for e in todo], texts=[e.text for e in todo])
    planned = list(batches(todo, cfg.batch_size, cfg.batch_tokens, cfg.batching,
                           pad_id(tokenizer)))
    report.batches = len(planned)
    run.save(True)
    start = time.perf_counter()
    log_batches(run, model, track(planned, len(planned), "logging", progress), _describe,
                _loss(model))
    run.flush()
    report.log_seconds = time.perf_counter() - start
    start = time.perf_counter()
    run.finalize()
    report.finalize_seconds = time.perf_counter() - start
    report.seconds = time.perf_counter() - clock
    return report


# --------------------------------------------------------------------------- score
@dataclass
class ScoreReport:
    path: str
    queries: int
    contrast: int
    train: int  # training examples scored
    hessian: str
    seconds: float


def score(project: Optional[str], queries: Optional[str] = None,
          prompts: Sequence[str] = (), completions: Sequence[str] = (),
          out: Optional[str] = None, aggregate: str = "none", contrast: Optional[str] = None,
          train: Optional[str] = None, k: int = 10, hessian: Optional[str] = None,
          mode: Optional[str] = None, damping: Optional[float] = None,
          cfg: Optional[BuildConfig] = None, progress: bool = True) -> ScoreReport:
    """Score queries (a dataset file `queries`, read with the build's column options, and/or
    `prompts` / `completions` pairs) against the built `project`, or, with `train` (a dataset),
    against it on the fly: its rows are computed per batch, scored against the queries and
    dropped, keeping per (aggregated) query the k most helpful and k most harmful. On the fly
    uses hessian "none" (other curvatures need stored statistics: build the project).

    aggregate: "none" keeps one score row per query; "mean" / "sum" / "max" make one row over
    the queries. contrast: a dataset whose queries' mean score is subtracted from every row.
    cfg: the model, tokenizer and column options (default: the project's build.yaml).
    Writes a score file (`logix top` reads it) and returns where."""
    clock = time.perf_counter()
    if aggregate not in AGGREGATES:
        raise UsageError(f"aggregate={aggregate!r}; allowed: {', '.join(AGGREGATES)}.")
    if cfg is None:
        if project is None:
            raise UsageError("Scoring on the fly needs the model and tokenizer: pass a build "
                             "config (--config, or --model / --tokenizer).")
        cfg = BuildConfig.load(project)
    if len(prompts) != len(completions):
        raise UsageError(f"One completion per prompt: got {len(prompts)} prompts and "
                         f"{len(completions)} completions.")
    model = load_model(cfg.model, cfg.seed, cfg.device)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    query_examples = _examples(queries, cfg, tokenizer, "q") if queries else []
    if prompts:
        rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
        query_examples += make_examples(rows, tokenizer, Columns("completion"),
                                        cfg.max_length, "p")
    if not query_examples:
        raise UsageError("No queries: pass a query dataset (--queries) or --prompt / "
                         "--completion pairs.")
    contrast_examples = _examples(contrast, cfg, tokenizer, "c") if contrast else []
    pad = pad_id(tokenizer)

    def planned(examples):
        return list(batches(examples, cfg.batch_size, cfg.batch_tokens, cfg.batching, pad))

    if train is None:
        if project is None:
            raise UsageError("Pass the built project folder, or a training dataset (--train) "
                             "to score on the fly.")
        project = os.path.abspath(project)
        run = _init(project, cfg)
        log = query_log(run, model, planned(query_examples + contrast_examples), _describe,
                        _loss(model))
        result = logix.Attributor(project).compute_influence_all(
            log, hessian=hessian, mode=mode, damping=damping, progress=progress)
        scores = combine(result["influence"], len(query_examples), aggregate)
        tgt_ids, used = result["tgt_ids"], result["meta"].get("hessian")
        meta = dict(result.get("meta") or {})
    else:
        if hessian not in (None, "none"):
            raise UsageError(f"On-the-fly scoring uses hessian 'none' (the curvature "
                             f"{hessian!r} needs statistics of the whole training set): build "
                             "the project with logix build and score against it instead.")
        scores, tgt_ids, meta = _on_the_fly(cfg, model, tokenizer, train, planned,
                                            query_examples, contrast_examples, aggregate, k,
                                            mode, progress)
        used = "none"
    src_ids = [e.id for e in query_examples] if aggregate == "none" else \
        [f"{aggregate} of {len(query_examples)} queries"]
    if contrast_examples:
        src_ids = [f"{s} - contrast" for s in src_ids]
    meta.update({"aggregate": aggregate, "queries": len(query_examples),
                 "contrast": len(contrast_examples), "on_the_fly": train is not None})
    if out is None:
        if project is None:
            raise UsageError("Pass --out FILE for the score file.")
        stem = os.path.splitext(os.path.basename(queries or "prompts"))[0]
        out = os.path.join(project, "scores", f"{stem}.safetensors")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    path = save_scores(out, {"influence": scores, "src_ids": src_ids, "tgt_ids": list(tgt_ids),
                             "meta": meta})
    return ScoreReport(path, len(query_examples), len(contrast_examples), len(tgt_ids),
                       used or "?", time.perf_counter() - clock)


def combine(scores: Tensor, n_queries: int, aggregate: str) -> Tensor:
    """[n_queries + n_contrast, n_train] -> the score rows: the queries' rows (aggregate
    "none") or one row (their mean, sum or max), minus the contrast rows' mean when there are
    contrast rows."""
    query, contrast = scores[:n_queries], scores[n_queries:]
    if aggregate == "mean":
        query = query.mean(0, keepdim=True)
    elif aggregate == "sum":
        query = query.sum(0, keepdim=True)
    elif aggregate == "max":
        query = query.max(0, keepdim=True).values
    if len(contrast):
        query = query - contrast.mean(0, keepdim=True)
    return query.contiguous()


def _on_the_fly(cfg, model, tokenizer, train, planned, query_examples, contrast_examples,
                aggregate, k, mode, progress):
    """Scores of the training rows computed in memory per batch against the queries'
    score plan (hessian "none"), with a running top-k and bottom-k per score row; returns the
    rows over the union of kept training ids (each kept id with its full score column)."""
    train_examples = _examples(train, cfg, tokenizer)
    with tempfile.TemporaryDirectory() as scratch:  # nothing is written to it
        run = _init(os.path.join(scratch, "on_the_fly"), cfg)
        _watch(run, model, cfg)
        run.setup({"grad": ["log"]})
        run.eval()
        log = log_batches(run, model, planned(query_examples + contrast_examples),
                          _describe, _loss(model))
        plan = run.influence.scorer(log, mode=mode, hessian="none")
        kept_scores: Optional[Tensor] = None  # [n_rows, kept]
        kept_ids: List = []
        train_batches = planned(train_examples)
        device = model_device(model)
        with eval_mode(model), frozen(model), torch.enable_grad():
            for batch in track(train_batches, len(train_batches), "scoring", progress):
                batch = to_device(batch, device)
                with run(data_id=batch["ids"], mask=batch["attention_mask"]):
                    summed_nll(model, batch).backward()
                rows = run.get_log().grads.float()  # [b, dim]
                norms = plan.norms_of(rows) if plan.needs_norms else None
                batch_scores = combine(plan.score(rows, norms).T.cpu(), len(query_examples),
                                       aggregate)  # [n_rows, b]
                kept_scores = batch_scores if kept_scores is None else \
                    torch.cat([kept_scores, batch_scores], 1)
                kept_ids += list(batch["ids"])
                kept_scores, kept_ids = _keep(kept_scores, kept_ids, k)
        meta = {**plan.meta, "project": None}
    return kept_scores, kept_ids, meta


def _keep(scores: Tensor, ids: List, k: int):
    """The columns among the k largest or k smallest of any row, in their order."""
    if scores.shape[1] <= 2 * k:
        return scores, ids
    top = scores.topk(k, 1).indices
    bottom = (-scores).topk(k, 1).indices
    keep = torch.unique(torch.cat([top.flatten(), bottom.flatten()]))  # sorted
    return scores[:, keep].contiguous(), [ids[i] for i in keep.tolist()]
