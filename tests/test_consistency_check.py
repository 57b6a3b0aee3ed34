"""logix check / check_consistency: padding and attention implementations give the same rows on
real Hugging Face models, and a layer that sees the padding is named."""

from __future__ import annotations

import json

import pytest
from torch import nn

from conftest import make_tiny_gpt2, seeded
from logix.cli import main
from logix.errors import UsageError
from logix.text.check import check_consistency


def _query_run(new_run, model, rank=4):
    run = new_run()
    run.watch(model).add_lora(rank=rank)
    run.setup({"grad": ["log"]})
    run.eval()
    return run


def test_gpt2_rows_agree_padded_and_across_attention(new_run):
    model = make_tiny_gpt2()
    model.train()
    report = check_consistency(_query_run(new_run, model), model, list(range(3, 13)))
    assert report.ok, report.render()
    assert set(report.differences) == {"right-padded", "left-padded", "attention sdpa"}
    assert all(len(layers) == 11 for layers in report.differences.values())
    assert model.config._attn_implementation == "eager" and model.training  # restored
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


class BagOfTokens(nn.Module):
    """A toy LM that mixes in the mean of every position, padding included (it ignores the
    attention mask), so its head sees the padding."""

    def __init__(self, vocab=30, dim=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        return self.head(h + h.mean(1, keepdim=True))


def test_a_layer_that_sees_the_padding_is_named(new_run):
    seeded(0)
    model = BagOfTokens()
    report = check_consistency(_query_run(new_run, model, rank=2), model, [1, 5, 7, 9, 2],
                               pad_id=3)
    assert not report.ok
    named = {(variant, layer) for variant, layer, _ in report.failures}
    assert {("right-padded", "head"), ("left-padded", "head")} <= named
    assert "DIFFERENT" in report.render() and "head" in report.render()
    assert "attention sdpa" not in report.differences  # no config: nothing to switch


def test_refusals(new_run):
    model = make_tiny_gpt2()
    run = new_run()
    run.watch(model).setup({"grad": ["log"]})
    run.save(True)
    with pytest.raises(UsageError, match=r"run.eval\(\)"):
        check_consistency(run, model, [1, 2, 3])
    run.eval()
    with pytest.raises(UsageError, match="at least two token ids"):
        check_consistency(run, model, [1])
    with pytest.raises(UsageError, match="pad must be a positive integer"):
        check_consistency(run, model, [1, 2], pad=0)


def test_logix_check_cli(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2,
                                  "vocab_size": 30, "n_positions": 32, "bos_token_id": 0,
                                  "eos_token_id": 0, "tie_word_embeddings": False}))
    assert main(["check", str(config), "--rank", "4", "--tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "left-padded" in out and "same rows" in out
    assert main(["check", str(tmp_path / "missing.json")]) == 2
