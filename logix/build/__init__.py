"""Dataset-level commands (`logix build`, `logix score`): a training log of a whole local dataset
and queries scored against it or against a dataset on the fly. They drive a Run the way a
user's loop would (with the integrations' post-hoc passes) and save a replayable build.yaml.

    from logix.build import BuildConfig, build, score
    build(BuildConfig(project="logs/code", model="gpt2-folder", data="train.jsonl"))
    score("logs/code", queries="queries.jsonl", aggregate="mean")

`data`: rows from jsonl / csv / parquet / save_to_disk, examples (text windows, prompt /
completion, chat turns) and token-budget batches; `commands`: the build and score passes.
"""

from .commands import (AGGREGATES, BUILD_FILE, BuildConfig, BuildReport, ScoreReport, build,
                       load_model, load_tokenizer, score)
from .data import Columns, Example, batches, make_examples, plan_batches, read_rows

__all__ = ["AGGREGATES", "BUILD_FILE", "BuildConfig", "BuildReport", "Columns", "Example",
           "ScoreReport", "batches", "build", "load_model", "load_tokenizer", "make_examples",
           "plan_batches", "read_rows", "score"]
