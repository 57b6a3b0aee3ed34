"""The chatterbot-corpus language model shared by bergson_side_by_side.py and its Bergson worker
(which runs in another venv, so only torch and the standard library are imported here).

Sequences are byte-level: each English conversation of the chatterbot-corpus package (PyPI
chatterbot-corpus, YAML files it ships) is its lines joined by newlines, UTF-8 encoded, cut to
`max_tokens` bytes. Token PAD (256) pads a batch on the right; its positions carry no loss, and
attention is causal, so a padded sequence's gradient is its unpadded gradient.
"""

import glob
import os
import time

import torch
import torch.nn.functional as F

PAD = 256
VOCAB = 257


def conversations(data_dir: str) -> list:
    """The English conversations of chatterbot-corpus's data folder, in file and file order."""
    import yaml

    texts = []
    for path in sorted(glob.glob(os.path.join(data_dir, "english", "*.yml"))):
        with open(path, encoding="utf-8") as f:
            for lines in yaml.safe_load(f).get("conversations") or []:
                texts.append("\n".join(str(line) for line in lines))
    return texts


def encode(text: str, max_tokens: int) -> list:
    return list(text.encode("utf-8")[:max_tokens])


def batches(sequences: list, size: int):
    """(start, [size, T] right-padded ids) over `sequences` in order."""
    for start in range(0, len(sequences), size):
        chunk = sequences[start:start + size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), PAD, dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq)
        yield start, ids


def lm_loss(model, ids):
    """Next-token cross entropy summed over every real token of every sequence. position_ids are
    [B, T] so that every tracked input has the example axis first."""
    b, t = ids.shape
    logits = model(ids, position_ids=torch.arange(t).expand(b, t)).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           ids[:, 1:].reshape(-1), ignore_index=PAD, reduction="sum")


def plain_epoch_seconds(model, sequences: list, size: int) -> float:
    """One forward + backward over `sequences` with weight gradients and no tool: the baseline
    each logging pass is divided by, measured in the same process after one untimed batch (so
    that first-call costs, which the logging pass after it does not pay, stay out of it)."""
    _, first = next(iter(batches(sequences, size)))
    lm_loss(model, first).backward()
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    for _, ids in batches(sequences, size):
        lm_loss(model, ids).backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds
