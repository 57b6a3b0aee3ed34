"""logix build / logix score over local datasets: the same rows and scores as a hand-written loop,
resume, replay from build.yaml, chunk ids, completion-only and chat losses, aggregate and
contrast arithmetic, on-the-fly scores against stored-log scores, file formats and the CLI."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import logix
from conftest import assert_close_scaled
from logix.cli import main
from logix.errors import UsageError
from logix.build import BuildConfig, build, load_model, score
from logix.build.data import (Columns, batches, make_examples, plan_batches,
                                         read_rows)
from logix.storage.reader import LogReader
from logix.storage.scores import load_scores

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

TEXTS = ["def add(a, b):\n    return a + b\n",
         "import os\nprint(os.getcwd())\n" * 3,
         "class Point:\n    def __init__(self, x):\n        self.x = x\n",
         "for i in range(10):\n    print(i)\n",
         "x = [i * i for i in range(5)]\n",
         "with open('f') as f:\n    data = f.read()\n"]
CHAT = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}" \
       "{% if add_generation_prompt %}<assistant>{% endif %}"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny byte-level BPE tokenizer and a GPT-2 config.json (random weights), on disk."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("assets")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(TEXTS * 4))
    bpe = ByteLevelBPETokenizer()
    bpe.train([str(corpus)], vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"],
              show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.save_pretrained(root / "tok")
    chat = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    chat.chat_template = CHAT
    chat.save_pretrained(root / "chat_tok")
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    (root / "model").mkdir()
    config.save_pretrained(root / "model")
    return root


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def config(assets, tmp_path, name="p", **kw):
    data = kw.pop("data", None) or write_jsonl(tmp_path / "train.jsonl",
                                               [{"text": t} for t in TEXTS])
    values = dict(project=str(tmp_path / "logs" / name), model=str(assets / "model"),
                  tokenizer=str(assets / "tok"), data=data, max_length=16, batch_size=3,
                  batching="greedy", rank=4, device="cpu")
    values.update(kw)
    return BuildConfig(**values)


def quiet_build(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build(cfg, progress=False)


def rows_of(project_dir):
    reader = LogReader(project_dir, verify=False)
    ids, blocks = [], []
    for block_ids, block in reader:
        ids += [str(i) for i in block_ids]
        blocks.append(block.float())
    return ids, torch.cat(blocks)


# --------------------------------------------------------------------------- examples
def test_text_is_cut_into_windows_each_its_own_id(assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets / "tok")
    ids = tok(TEXTS[1])["input_ids"]
    examples = make_examples([{"text": TEXTS[0]}, {"text": TEXTS[1]}], tok, Columns(), 8)
    long = [e for e in examples if e.id.startswith("1:")]
    windows = [ids[s:s + 8] for s in range(0, len(ids), 8) if len(ids[s:s + 8]) > 1]
    assert [e.id for e in long] == [f"1:{c}" for c in range(len(windows))]
    assert [e.input_ids for e in long] == windows
    assert all(e.in_loss == [False] + [True] * (len(e) - 1) for e in long)


def test_completion_loss_leaves_out_the_prompt(assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets / "tok")
    (e,) = make_examples([{"prompt": "def add(a, b):", "completion": " return a + b"}], tok,
                         Columns(), 64)
    p = tok("def add(a, b):")["input_ids"]
    c = tok(" return a + b", add_special_tokens=False)["input_ids"]
    assert e.id == "0" and e.input_ids == p + c
    assert e.in_loss == [False] * len(p) + [True] * len(c)


def test_chat_loss_covers_the_assistant_turns_only(assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets / "chat_tok")
    messages = [{"role": "user", "content": "add"}, {"role": "assistant", "content": "a + b"},
                {"role": "user", "content": "mul"}, {"role": "assistant", "content": "a * b"}]
    (e,) = make_examples([{"messages": messages}], tok, Columns(), 128)
    in_loss = tok.decode([t for t, f in zip(e.input_ids, e.in_loss) if f])
    assert in_loss == "a + b</s>a * b</s>"
    assert tok.decode(e.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    plain = __import__("transformers").AutoTokenizer.from_pretrained(assets / "tok")
    with pytest.raises(UsageError, match="chat template"):
        make_examples([{"messages": messages}], plain, Columns(), 128)


def test_token_budget_batches():
    from logix.build.data import Example

    examples = [Example(str(i), [1] * n, [True] * n, "") for i, n in
                enumerate([3, 9, 4, 9, 2, 20])]
    greedy = plan_batches(examples, batch_tokens=18, order="greedy")
    assert greedy == [[0, 1], [2, 3], [4], [5]]  # 3x9 > 18; 20 > 18 goes alone
    assert plan_batches(examples, batch_tokens=18, order="sorted") == [[5], [1, 3], [2, 0, 4]]
    batch = next(batches(examples[:2], batch_size=2, order="greedy", pad_id=7))
    assert batch["input_ids"].shape == (2, 9) and batch["attention_mask"][0].tolist() == \
        [1] * 3 + [0] * 6 and batch["input_ids"][0, 3:].tolist() == [7] * 6


def test_file_formats(tmp_path):
    rows = [{"text": "a b"}, {"text": "c"}]
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["text"])
        writer.writeheader()
        writer.writerows(rows)
    assert read_rows(str(path)) == rows
    assert read_rows(write_jsonl(tmp_path / "d.jsonl", rows), limit=1) == rows[:1]
    if importlib.util.find_spec("pyarrow"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
        assert read_rows(str(tmp_path / "d.parquet")) == rows
    else:
        (tmp_path / "d.parquet").write_bytes(b"")
        with pytest.raises(UsageError, match=r"logix\[datasets\]"):
            read_rows(str(tmp_path / "d.parquet"))
    if importlib.util.find_spec("datasets"):
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
        assert read_rows(str(tmp_path / "disk")) == rows
    else:
        (tmp_path / "disk").mkdir()
        with pytest.raises(UsageError, match=r"logix\[datasets\]"):
            read_rows(str(tmp_path / "disk"))


# --------------------------------------------------------------------------- build and score
def hand_loop(assets, tmp_path, cfg):
    """The loop a user writes: same model, tokenizer, windows and batches, logged by hand."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets / "tok")
    model = load_model(cfg.model, cfg.seed, "cpu")
    examples = []
    for r, text in enumerate(TEXTS):
        ids = tok(text)["input_ids"]
        examples += [(f"{r}:{c}", ids[s:s + 16]) for c, s in enumerate(range(0, len(ids), 16))
                     if len(ids[s:s + 16]) > 1]
    run = logix.init("hand", root_dir=str(tmp_path / "hand"), seed=0)
    run.watch(model)
    run.add_lora(rank=4)
    run.setup({"grad": ["log"], "forward": ["covariance"], "backward": ["covariance"]})
    run.declare_curvature("ekfac")
    run.save(True)
    model.eval()
    with logix.frozen(model):
        for s in range(0, len(examples), 3):
            batch = examples[s:s + 3]
            length = max(len(x) for _, x in batch)
            ids = torch.tensor([x + [0] * (length - len(x)) for _, x in batch])
            mask = torch.tensor([[1] * len(x) + [0] * (length - len(x)) for _, x in batch])
            with run(data_id=[i for i, _ in batch], mask=mask):
                logits = model(ids, attention_mask=mask).logits
                nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:],
                                      reduction="none")
                (nll * mask[:, 1:]).sum().backward()
    run.finalize()
    run.eval()
    query = logix.text.query_log(run, model, ["def add(a"], [", b):\n"], tokenizer=tok)
    return run, query


def test_build_then_score_equals_the_hand_written_loop(assets, tmp_path):
    cfg = config(assets, tmp_path)
    report = quiet_build(cfg)
    assert report.logged == report.examples > len(TEXTS) and report.skipped == 0
    run, query = hand_loop(assets, tmp_path, cfg)
    ids, rows = rows_of(cfg.project)
    hand_ids, hand_rows = rows_of(run.project_dir)
    assert ids == hand_ids and len(ids) == report.logged
    assert torch.equal(rows, hand_rows)
    out = score(cfg.project, prompts=["def add(a"], completions=[", b):\n"],
                out=str(tmp_path / "s.safetensors"), progress=False)
    ours = load_scores(out.path)
    theirs = run.compute_influence_all(query, progress=False)
    assert ours["tgt_ids"] == theirs["tgt_ids"] and out.hessian == "ekfac"
    torch.testing.assert_close(ours["influence"], theirs["influence"], rtol=1e-5, atol=1e-6)
    assert ours["influence"].abs().max() > 0
    from logix.storage.content import load_content

    assert load_content(cfg.project).get("0:0")["text"].startswith("def add")


def test_a_rerun_skips_ids_already_logged(assets, tmp_path):
    cfg = config(assets, tmp_path, limit=2)
    first = quiet_build(cfg)
    import dataclasses

    second = quiet_build(dataclasses.replace(cfg, limit=None))
    assert second.skipped == first.logged and second.logged == second.examples - first.logged
    third = quiet_build(dataclasses.replace(cfg, limit=None))
    assert third.logged == 0 and third.skipped == third.examples
    ids, _ = rows_of(cfg.project)
    assert len(ids) == len(set(ids)) == second.examples
    with pytest.raises(UsageError, match="max_length"):
        quiet_build(dataclasses.replace(cfg, max_length=32))


def test_build_yaml_replays_the_build(assets, tmp_path):
    cfg = config(assets, tmp_path, batch_tokens=40, batching="sorted")
    quiet_build(cfg)
    saved = os.path.join(cfg.project, "build.yaml")
    again = str(tmp_path / "logs" / "again")
    assert main(["build", again, "--config", saved, "--no-progress"]) == 0
    assert BuildConfig.load(again).to_dict() == {**BuildConfig.load(saved).to_dict(),
                                                 "project": again}
    a, b = rows_of(cfg.project), rows_of(again)
    assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_aggregate_and_contrast_arithmetic(assets, tmp_path):
    cfg = config(assets, tmp_path)
    quiet_build(cfg)
    queries = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "def ", "completion": "add(a"},
                                                 {"prompt": "for i", "completion": " in x"},
                                                 {"prompt": "import", "completion": " os"}])
    contrast = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "x = ", "completion": "[i"},
                                                  {"prompt": "class", "completion": " Point"}])

    def run(name, **kw):
        return load_scores(score(cfg.project, queries=queries, out=str(tmp_path / name),
                                 progress=False, **kw).path)

    base = run("none.safetensors")["influence"]
    assert base.shape[0] == 3
    c = load_scores(score(cfg.project, queries=contrast, out=str(tmp_path / "c.safetensors"),
                          progress=False).path)["influence"]
    # queries and contrast are scored in one pass there, apart here: float32 round-off
    assert_close_scaled(run("m.safetensors", aggregate="mean")["influence"],
                        base.mean(0, keepdim=True))
    assert_close_scaled(run("s.safetensors", aggregate="sum")["influence"],
                        base.sum(0, keepdim=True))
    assert_close_scaled(run("x.safetensors", aggregate="max")["influence"],
                        base.max(0, keepdim=True).values)
    mean_c = run("mc.safetensors", aggregate="mean", contrast=contrast)
    assert_close_scaled(mean_c["influence"], base.mean(0, keepdim=True) - c.mean(0, keepdim=True))
    assert_close_scaled(run("nc.safetensors", contrast=contrast)["influence"],
                        base - c.mean(0, keepdim=True))
    assert mean_c["src_ids"] == ["mean of 3 queries - contrast"]


def test_on_the_fly_scores_equal_stored_log_scores(assets, tmp_path):
    cfg = config(assets, tmp_path)
    quiet_build(cfg)
    queries = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "def ", "completion": "add(a"},
                                                 {"prompt": "for i", "completion": " in x"}])
    stored = load_scores(score(cfg.project, queries=queries, hessian="none",
                               out=str(tmp_path / "stored.safetensors"), progress=False).path)
    n = len(stored["tgt_ids"])
    fly = load_scores(score(None, queries=queries, train=cfg.data, cfg=cfg, k=n,
                            out=str(tmp_path / "fly.safetensors"), progress=False).path)
    order = [fly["tgt_ids"].index(i) for i in stored["tgt_ids"]]
    torch.testing.assert_close(fly["influence"][:, order], stored["influence"], rtol=1e-5,
                               atol=1e-6)
    k = 2  # a running top-k: each row's k best and worst are kept, with their exact scores
    small = load_scores(score(None, queries=queries, train=cfg.data, cfg=cfg, k=k,
                              out=str(tmp_path / "k.safetensors"), progress=False).path)
    assert len(small["tgt_ids"]) <= 2 * k * 2
    for q in range(2):
        best = set(stored["influence"][q].topk(k).indices.tolist())
        assert {stored["tgt_ids"][i] for i in best} <= set(small["tgt_ids"])
    with pytest.raises(UsageError, match="hessian 'none'"):
        score(None, queries=queries, train=cfg.data, cfg=cfg, hessian="ekfac",
              out=str(tmp_path / "e.safetensors"), progress=False)


def test_cli_build_score_top(assets, tmp_path, capsys):
    train = tmp_path / "train.csv"
    with open(train, "w", newline="") as f:
        writer = csv.DictWriter(f, ["prompt", "completion"])
        writer.writeheader()
        writer.writerows([{"prompt": t[:8], "completion": t[8:]} for t in TEXTS])
    project = str(tmp_path / "logs" / "cli")
    assert main(["build", project, "--model", str(assets / "model"), "--tokenizer",
                 str(assets / "tok"), "--data", str(train), "--rank", "4", "--max-length", "32",
                 "--batch-tokens", "64", "--device", "cpu", "--no-progress"]) == 0
    assert f"{len(TEXTS)} examples logged" in capsys.readouterr().out
    assert main(["score", project, "--prompt", "def add", "--completion", "(a, b)",
                 "--no-progress"]) == 0
    path = os.path.join(project, "scores", "prompts.safetensors")
    assert os.path.isfile(path)
    capsys.readouterr()
    assert main(["top", path, "--k", "2", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)
    assert top[0]["src_id"] == "p0" and "text" in top[0]["helpful"][0]
    assert main(["build", str(tmp_path / "x")]) == 2


def test_models_from_a_weights_folder_or_a_config(assets, tmp_path):
    first = load_model(str(assets / "model"), seed=3, device="cpu")
    again = load_model(str(assets / "model" / "config.json"), seed=3, device="cpu")
    other = load_model(str(assets / "model"), seed=4, device="cpu")
    state = first.state_dict()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in state.items())
    assert not torch.equal(state["lm_head.weight"], other.state_dict()["lm_head.weight"])
    first.save_pretrained(tmp_path / "trained")
    loaded = load_model(str(tmp_path / "trained"), seed=99, device="cpu")  # weights: no seed
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in state.items())
    with pytest.raises(UsageError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
