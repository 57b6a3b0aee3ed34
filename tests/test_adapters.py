"""PEFT LoRA adapters: watching a PEFT model logs only its active lora_A / lora_B layers, and the
logged per-example gradients equal brute force; quantised layers are never hooked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_close_scaled, gradient_matrix, per_example_grads_loop, seeded

peft = pytest.importorskip("peft")


def make_lora_llama(seed: int = 0):
    """A 2-layer Llama (width 16, vocab 40, eager) with LoRA r=4 on q_proj and v_proj; lora_B is
    drawn at random (PEFT starts it at zero, which would make lora_A's gradient zero)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    seeded(seed)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         attn_implementation="eager")
    model = peft.get_peft_model(LlamaForCausalLM(config), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def test_watch_picks_the_adapters_and_logs_their_exact_gradients(new_run):
    model = make_lora_llama()
    run = new_run()
    run.watch(model)
    expected_names = {n for n, m in model.named_modules()
                      if isinstance(m, nn.Linear) and (".lora_A." in n or ".lora_B." in n)}
    assert set(run.modules) == expected_names and len(expected_names) == 8
    run.setup({"grad": ["log"]})
    run.eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0

    def per_example_losses():
        logits = model(input_ids=ids, attention_mask=mask).logits
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        return (nll * mask[:, 1:]).sum(1)  # [B]

    with run(data_id=[0, 1, 2], mask=mask):
        per_example_losses().sum().backward()
    log = run.get_log()
    names = [f"{n}.weight" for n in run.modules]
    model.zero_grad()
    brute = per_example_grads_loop(model, per_example_losses(), names=names)
    for name, tracked in run.modules.items():
        expected = gradient_matrix(tracked.module, brute, f"{name}.")
        assert float(expected.abs().max()) > 0, name
        assert_close_scaled(log.module(name), expected)


def test_name_filter_reaches_base_layers_and_quantized_layers_are_skipped(new_run):
    model = make_lora_llama()
    run = new_run()
    run.watch(model, name_filter="layers.0.self_attn.q_proj")
    assert sorted(n.rsplit("q_proj.", 1)[1] for n in run.modules) == [
        "base_layer", "lora_A.default", "lora_B.default"]

    class Int8Linear(nn.Linear):  # what a quantised layer looks like: an int8 weight
        pass

    seeded(0)
    quantized = Int8Linear(4, 4)
    quantized.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    other = new_run("q")
    other.watch(nn.Sequential(quantized, nn.Linear(4, 2)))
    assert list(other.modules) == ["1"]
