"""LogIX and Bergson side by side on one small language model.

    python benchmarks/bergson_side_by_side.py --make-bergson-venv DIR   # a new venv, outside the repo
    python benchmarks/bergson_side_by_side.py --bergson-venv PATH [--train 2006] [--rank 16]

The model: GPT-2 from its config (4 layers x 128, byte-level vocabulary, a context of 32 x
--max-tokens positions so that Bergson may pack as many tokens into a batch as LogIX's batches of
32 sequences hold: 1.35M parameters, 0.79M of them in the tracked matrices; dropout off), trained
from random init for `--adam-epochs` epochs of Adam on the training sequences; its weights go to
both tools through one save_pretrained folder, its Adam state through one optimizer.pt. The data:
the English conversations of the chatterbot-corpus package (installed in the Bergson venv, which
this script reads it from), one byte-level sequence per conversation cut to `--max-tokens`;
`--queries` of them are held out (seeded draw), the rest are training sequences. Both tools track
the same 16 weight matrices (each block's attention and MLP Conv1D layers, no bias) at the same
projection rank (`--rank` per side, so rank^2 numbers per layer and example), in fp32 on the CPU,
each in its own process:

  logging pass   LogIX: `run.watch(model, name_filter="transformer.h.")`, `add_lora(rank)`,
                 rows saved, inside `logix.frozen(model)`; Bergson: `bergson.build.build` (what
                 `bergson build` runs), `projection_dim=rank`. Each is divided by a plain
                 forward + backward epoch measured first in the same process.
  disk, memory   the log's / index's folder; the worker's peak resident set after collecting.
  top-10 overlap the training examples each tool ranks top-10 by gradient dot product for each
                 held-out query, against the top-10 of exact per-example gradients of the same
                 16 matrices (torch.func.vmap(grad)), averaged over queries.
  probes         `--probes` training sequences (drawn among the ones that occur once) copied as
                 queries: is the source the top-1 (top-10) match? By dot product and cosine,
                 without and with the Adam second moments: LogIX's `hessian="optimizer"`
                 (`run.add_optimizer_state`), Bergson's normalizer (`optimizer_state=`).

Bergson runs in a venv of its own (--make-bergson-venv: torch==2.13.0 CPU first, then Bergson's
pure-Python requirements pinned, then bergson==2.5.1 with --no-deps: its torchvision, torchaudio
and bitsandbytes requirements are never imported on this path; FAISS needs a GPU build and is not
used). Timings on a shared machine are noisy: compare the ratios, and read the load printed with
them.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import dir_bytes, human_bytes, make_gpt2, peak_rss_mb  # noqa: E402
from _lm_corpus import (PAD, VOCAB, batches, conversations, encode, lm_loss,  # noqa: E402
                        plain_epoch_seconds)

BERGSON_INSTALL = (
    ("torch==2.13.0",),
    ("torch==2.13.0", "accelerate==1.16.0", "datasets==5.2.0", "jinja2==3.1.6",
     "jaxtyping==0.3.11", "ml_dtypes==0.7.0", "natsort==8.4.0", "numpy==2.4.6", "scipy==1.17.1",
     "peft==0.21.2", "petname==2.9", "pyarrow==26.0.1", "pyyaml==6.0.4", "simple-parsing==0.1.9",
     "torchopt==0.7.3", "transformers==5.25.0", "huggingface-hub==2.4.0",
     "chatterbot-corpus==1.3.3"),
    ("--no-deps", "bergson==2.5.1"),
)
BERGSON_CHECK = "import bergson, chatterbot_corpus, sys; sys.exit(bergson.__version__ != '2.5.1')"
LAYERS = "transformer.h."
BATCH = 32


# ============================================================================ setup
def make_bergson_venv(path: Path) -> None:
    """Create the Bergson venv at `path` (kept if it already imports bergson 2.5.1)."""
    python = path / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-I", "-c", BERGSON_CHECK],
                                          capture_output=True).returncode == 0:
        return
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    for args in BERGSON_INSTALL:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *args], check=True)


def corpus_dir(python: Path) -> str:
    code = ("import chatterbot_corpus, os; "
            "print(os.path.join(os.path.dirname(chatterbot_corpus.__file__), 'data'))")
    return subprocess.run([str(python), "-I", "-c", code], check=True, capture_output=True,
                          text=True).stdout.strip()


def split(sequences: list, n_queries: int, n_probes: int, n_train: int, seed: int = 0):
    """(train, held-out queries, probe indices into train): a seeded draw of held-out queries;
    probes among the training sequences that occur once (a copy can only find its source)."""
    rng = random.Random(seed)
    order = list(range(len(sequences)))
    rng.shuffle(order)
    held = set(order[:n_queries])
    train = [s for i, s in enumerate(sequences) if i not in held][:n_train]
    counts = {}
    for s in train:
        counts[tuple(s)] = counts.get(tuple(s), 0) + 1
    unique = [i for i, s in enumerate(train) if counts[tuple(s)] == 1]
    return train, [sequences[i] for i in order[:n_queries]], sorted(rng.sample(unique, n_probes))


def train_briefly(model, train: list, epochs: int, lr: float):
    """Adam from random init over `train` (shuffled batches); returns the optimizer."""
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    rng = random.Random(1)
    for _ in range(epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        for _, ids in batches([train[i] for i in order], BATCH):
            optimizer.zero_grad()
            (lm_loss(model, ids) / (ids[:, 1:] != PAD).sum()).backward()
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def save_model(model, folder: Path, max_tokens: int) -> None:
    """save_pretrained weights plus a tokenizer Bergson can load (inputs come pre-tokenized; it
    only reads the pad token and the maximum length)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(PAD)} | {"<pad>": PAD}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, "<pad>")),
                                        pad_token="<pad>", model_max_length=max_tokens)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# ============================================================================ exact
def exact_scores(model, train: list, queries: list, chunk: int = 8):
    """[n_query, n_train] dot products of exact per-example gradients of the tracked matrices."""
    import torch
    from torch.func import functional_call, grad, vmap

    names = [n for n, p in model.named_parameters() if n.startswith(LAYERS) and p.ndim == 2]
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}

    def loss(p, ids):
        def forward(x, position_ids):
            return functional_call(model, p, (x,), {"position_ids": position_ids})
        return lm_loss(forward, ids[None])

    width = max(len(s) for s in train + queries)  # one shape for every call: memory stays flat

    def flat(seqs):
        ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, :len(seq)] = torch.tensor(seq)
        g = vmap(grad(loss), in_dims=(None, 0))(params, ids)
        return torch.cat([g[n].reshape(len(seqs), -1) for n in names], 1)

    with torch.no_grad():  # grad() still differentiates; no graph through the other weights
        q = flat(queries)
        scores = torch.cat([flat(train[i:i + chunk]) @ q.T for i in range(0, len(train), chunk)])
    return scores.T, len(names)


# ============================================================================ tools
def logix_worker(inp: str, outp: str) -> None:
    """LogIX's side, in a process of its own (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    import logix

    spec = torch.load(inp, weights_only=False)
    torch.set_num_threads(spec["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"])
    plain = plain_epoch_seconds(model, spec["train"], BATCH)
    run = logix.init("lm", root_dir=spec["root"])
    run.watch(model, name_filter=LAYERS)
    run.add_lora(rank=spec["rank"])
    run.setup({"grad": ["log"]})
    run.save(True)
    start = time.perf_counter()
    with logix.frozen(model):
        for first, ids in batches(spec["train"], BATCH):
            with run(data_id=list(range(first, first + len(ids)))):
                lm_loss(model, ids).backward()
        run.finalize()
    seconds = time.perf_counter() - start
    out = {"version": logix.__version__, "plain_seconds": plain, "build_seconds": seconds,
           "peak_rss_mib": peak_rss_mb(), "disk_bytes": dir_bytes(run.project_dir),
           "modules": list(run.modules), "scores": {}}
    run.eval()
    queries = spec["queries"]
    with run(data_id=[f"q{i}" for i in range(len(queries))]):
        lm_loss(model, next(batches(queries, len(queries)))[1]).backward()
    log = run.get_log(copy=True)
    for hessian in ("none", "optimizer"):
        if hessian == "optimizer":
            run.add_optimizer_state(torch.load(spec["optimizer"]), params=model.parameters())
        for mode in ("dot", "cosine"):
            result = run.compute_influence_all(log, mode=mode, hessian=hessian, progress=False)
            order = [int(i) for i in result["tgt_ids"]]
            scores = torch.empty_like(result["influence"])
            scores[:, order] = result["influence"]
            out["scores"][(hessian, mode)] = scores
    torch.save(out, outp)


def run_tool(python: str, script: Path, spec: dict, root: Path, extra=()) -> dict:
    import torch

    root.mkdir(parents=True, exist_ok=True)
    inp, outp = root / "in.pt", root / "out.pt"
    torch.save(dict(spec, root=str(root)), inp)
    proc = subprocess.run([python, str(script), *extra, str(inp), str(outp)], cwd=str(HERE),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
        raise RuntimeError(f"{script.name} failed (rc={proc.returncode}):\n{tail}")
    return torch.load(outp, weights_only=False)


def pairwise(queries, train, cosine: bool):
    import torch.nn.functional as F

    if cosine:
        queries, train = F.normalize(queries.double(), dim=1), F.normalize(train.double(), dim=1)
    return queries.double() @ train.double().T


# ============================================================================ metrics
def top_overlap(scores, exact, k: int = 10) -> float:
    hits = [len(set(s.topk(k).indices.tolist()) & set(e.topk(k).indices.tolist())) / k
            for s, e in zip(scores, exact)]
    return sum(hits) / len(hits)


def probe_hits(scores, sources: list, k: int = 10) -> tuple:
    top = scores.topk(k, dim=1).indices
    return (sum(int(t[0] == s) for t, s in zip(top, sources)),
            sum(int(s in t.tolist()) for t, s in zip(top, sources)))


def markdown(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def report(args, logix_out, bergson_out, exact, n_layers, n_train, probes) -> str:
    n_q, n_p = args.queries, len(probes)
    ours = logix_out["scores"]
    theirs = {}
    for normalizer, suffix in (("none", ""), ("optimizer", "_adam")):
        for mode in ("dot", "cosine"):
            theirs[(normalizer, mode)] = pairwise(bergson_out["queries" + suffix],
                                                  bergson_out["train" + suffix], mode == "cosine")

    def pair(fn):
        return [fn(logix_out, ours), fn(bergson_out, theirs)]

    def probes_row(normalizer, mode):
        def cell(_, scores):
            top1, topk = probe_hits(scores[(normalizer, mode)][n_q:], probes)
            return f"{top1}/{n_p} ({topk}/{n_p})"
        name = "none" if normalizer == "none" else "Adam second moments"
        return [f"probe top-1 (top-10), {mode}, normalizer: {name}"] + pair(cell)

    rows = [
        ["logging pass, s"] + pair(lambda o, _: f"{o['build_seconds']:.1f}"),
        ["plain fwd+bwd epoch in the same process, s"]
        + pair(lambda o, _: f"{o['plain_seconds']:.1f}"),
        ["logging / plain epoch"]
        + pair(lambda o, _: f"{o['build_seconds'] / o['plain_seconds']:.2f}x"),
        ["disk"] + pair(lambda o, _: human_bytes(o["disk_bytes"])),
        ["peak resident set after collecting, MiB"]
        + pair(lambda o, _: f"{o['peak_rss_mib']:.0f}"),
        ["layers tracked"] + pair(lambda o, _: len(o["modules"])),
        [f"top-10 overlap with exact gradients (dot, {n_q} held-out queries)"]
        + pair(lambda _, s: f"{top_overlap(s[('none', 'dot')][:n_q], exact):.2f}"),
    ] + [probes_row(n, m) for n in ("none", "optimizer") for m in ("dot", "cosine")]
    title = (f"GPT-2 {args.layers}x128 from config, {n_train} chatterbot-corpus sequences "
             f"(<= {args.max_tokens} byte tokens), {n_layers} weight matrices at rank "
             f"{args.rank} per side, {args.threads} threads, fp32 CPU; load before "
             f"{args.load_before:.2f}, after {os.getloadavg()[0]:.2f}. LogIX "
             f"{logix_out['version']}, Bergson {bergson_out['version']}.")
    return title + "\n\n" + markdown(["", "LogIX", "Bergson"], rows)


# ============================================================================ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    venv = ap.add_mutually_exclusive_group(required=True)
    venv.add_argument("--bergson-venv", type=Path, help="a venv with bergson 2.5.1")
    venv.add_argument("--make-bergson-venv", type=Path, help="create that venv here, then use it")
    ap.add_argument("--train", type=int, default=10**9, help="at most this many training seqs")
    ap.add_argument("--queries", type=int, default=20, help="held-out queries for the overlap")
    ap.add_argument("--probes", type=int, default=20)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--adam-epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--root", type=Path, default=None, help="scratch folder (default: /tmp)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()
    args.load_before = os.getloadavg()[0]
    if args.make_bergson_venv:
        make_bergson_venv(args.make_bergson_venv)
    python = (args.make_bergson_venv or args.bergson_venv).resolve() / "bin" / "python"
    if not python.exists():
        ap.error(f"no {python}; create the venv with --make-bergson-venv PATH")

    import torch

    torch.set_num_threads(args.threads)
    texts = conversations(corpus_dir(python))
    sequences = [encode(t, args.max_tokens) for t in texts]
    train, held_out, probes = split(sequences, args.queries, args.probes, args.train)
    # Bergson packs at most the model's context into one batch: room for BATCH sequences
    model = make_gpt2(n_layer=args.layers, n_embd=128, n_head=4,
                      n_positions=BATCH * args.max_tokens, vocab_size=VOCAB)
    optimizer = train_briefly(model, train, args.adam_epochs, args.lr)
    root = Path(tempfile.mkdtemp(prefix="bergson-side-", dir=args.root))
    save_model(model, root / "model", BATCH * args.max_tokens)
    torch.save(optimizer.state_dict(), root / "optimizer.pt")
    spec = {"model_dir": str(root / "model"), "optimizer": str(root / "optimizer.pt"),
            "train": train, "queries": held_out + [train[i] for i in probes],
            "rank": args.rank, "threads": args.threads, "batch": BATCH,
            "token_batch": BATCH * args.max_tokens}
    print(f"{len(train)} training sequences, {len(held_out)} held-out queries, {len(probes)} "
          f"probes; {sum(p.numel() for p in model.parameters()):,} parameters", file=sys.stderr)
    logix_out = run_tool(sys.executable, Path(__file__), spec, root / "logix", ["--logix-worker"])
    bergson_out = run_tool(str(python), HERE / "_peer_bergson.py", spec, root / "bergson")
    exact, n_layers = exact_scores(model.eval(), train, held_out)
    probe_rows = bergson_out["queries"][args.queries:]
    copies = (probe_rows - bergson_out["train"][probes]).norm(dim=1) / probe_rows.norm(dim=1)
    moved = (bergson_out["train_adam"] - bergson_out["train"]).norm() \
        / bergson_out["train"].norm()
    print(f"Bergson: probe rows vs their sources' rows, max relative difference "
          f"{copies.max():.2e}; normalized vs plain rows, relative difference {moved:.2f}",
          file=sys.stderr)
    text = report(args, logix_out, bergson_out, exact, n_layers, len(train), probes)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--logix-worker":
        logix_worker(sys.argv[2], sys.argv[3])
    else:
        main()
