"""Bergson (PyPI bergson 2.5.1, EleutherAI) on bergson_side_by_side.py's language model, run
under the Bergson venv's python (`--bergson-venv`):

    BERGSON_VENV/bin/python benchmarks/_peer_bergson.py IN.pt OUT.pt

IN.pt: {"model_dir" (save_pretrained weights and tokenizer), "train", "queries" (token id lists),
"optimizer" (a torch optimizer.pt path), "rank", "root", "batch", "threads"}.
OUT.pt: {"version", "plain_seconds", "build_seconds", "peak_rss_mib", "disk_bytes", "modules",
"train", "queries" (float32 [n, dim] gradients, columns module by module), "train_adam",
"queries_adam" (the same with Bergson's optimizer normalizer)}.

Bergson's own pipeline, called as its `bergson build` command calls it: `bergson.build.build` with
an `IndexConfig` (the model folder, a JSON-lines dataset of `input_ids`, `projection_dim=rank`,
fp32, the default target modules: every Conv1D of GPT-2's blocks) and a default
`PreprocessConfig`; the index is read back with `bergson.load_gradients`. Queries go through the
same build, as `bergson query` does (the same projections and normalizer). With
`optimizer_state=` Bergson divides each gradient by the optimizer's sqrt(v) (its Adam
normalizer) before projecting. The timed build is the first (no normalizer) and includes
Bergson's data loading; the peak resident set is read right after it.
"""

import json
import os
import resource
import sys
import time

import numpy as np
import torch

import bergson
from bergson.build import build
from bergson.config.config import DataConfig, IndexConfig, PreprocessConfig

from _lm_corpus import plain_epoch_seconds


def write_jsonl(path: str, sequences: list) -> str:
    with open(path, "w") as f:
        for seq in sequences:
            f.write(json.dumps({"input_ids": seq}) + "\n")
    return path


def run_build(run_path: str, spec: dict, data: str, optimizer: str = "") -> np.ndarray:
    cfg = IndexConfig(run_path=run_path, model=spec["model_dir"], data=DataConfig(dataset=data),
                      projection_dim=spec["rank"], precision="fp32", optimizer_state=optimizer,
                      token_batch_size=spec["token_batch"], overwrite=True)
    cfg.distributed.nproc_per_node = 1
    build(cfg, PreprocessConfig())
    return np.array(bergson.load_gradients(run_path), dtype=np.float32)


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main(inp: str, outp: str) -> None:
    spec = torch.load(inp, weights_only=False)
    torch.set_num_threads(spec["threads"])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"])
    plain = plain_epoch_seconds(model, spec["train"], spec["batch"])
    del model
    root = spec["root"]
    train = write_jsonl(os.path.join(root, "train.jsonl"), spec["train"])
    queries = write_jsonl(os.path.join(root, "queries.jsonl"), spec["queries"])
    start = time.perf_counter()
    rows = run_build(os.path.join(root, "index"), spec, train)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(os.path.join(root, "index", "info.json")) as f:
        modules = list(json.load(f)["grad_sizes"])
    out = {"version": bergson.__version__, "plain_seconds": plain, "build_seconds": seconds,
           "peak_rss_mib": peak, "disk_bytes": dir_bytes(os.path.join(root, "index")),
           "modules": modules, "train": torch.from_numpy(rows),
           "queries": torch.from_numpy(run_build(os.path.join(root, "q"), spec, queries)),
           "train_adam": torch.from_numpy(run_build(os.path.join(root, "index-adam"), spec,
                                                    train, spec["optimizer"])),
           "queries_adam": torch.from_numpy(run_build(os.path.join(root, "q-adam"), spec,
                                                      queries, spec["optimizer"]))}
    torch.save(out, outp)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
