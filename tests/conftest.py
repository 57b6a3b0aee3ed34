"""Shared test helpers: seeded tiny model factories, a temporary LogIX root, brute-force
per-example gradients and the matrix view of a layer's weight gradient.

Factories and helpers are plain functions (`from conftest import make_mlp`); the fixtures are
`tmp_root` (a fresh root_dir), `new_run` (logix.init rooted there) and an autouse reset of the
module-level current run. Every model is small enough to run on a laptop CPU in milliseconds.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Dict, Optional

import pytest
import torch
from torch import Tensor, nn

import logix

# So that `from conftest import ...` works whatever the import mode.
sys.path.insert(0, os.path.dirname(__file__))


# --------------------------------------------------------------------------- seeded factories
def seeded(seed: int) -> torch.Generator:
    """Seed torch's global RNG (layer init) and return a generator for test data."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed + 10_000)


def make_mlp(in_dim: int = 6, hidden: int = 5, out_dim: int = 3, bias: bool = True,
             seed: int = 0) -> nn.Sequential:
    seeded(seed)
    return nn.Sequential(nn.Linear(in_dim, hidden, bias=bias), nn.Tanh(),
                         nn.Linear(hidden, out_dim, bias=bias))


class SharedLinear(nn.Module):
    """One Linear called twice in the same forward (weight sharing)."""

    def __init__(self, dim: int = 5, out_dim: int = 3) -> None:
        super().__init__()
        self.shared = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.shared(torch.tanh(self.shared(x))))


def make_shared(dim: int = 5, out_dim: int = 3, seed: int = 0) -> SharedLinear:
    seeded(seed)
    return SharedLinear(dim, out_dim)


class ConvNet(nn.Module):
    """A conv layer (any geometry) followed by a linear head; input [B, C, *spatial]."""

    def __init__(self, conv: nn.Module, flat_dim: int, out_dim: int = 3) -> None:
        super().__init__()
        self.conv = conv
        self.head = nn.Linear(flat_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def make_conv_model(dims: int = 2, in_channels: int = 4, out_channels: int = 6,
                    kernel_size=3, size: int = 7, seed: int = 0, **conv_kwargs) -> ConvNet:
    """ConvNet around nn.Conv1d (dims=1) or nn.Conv2d (dims=2); conv_kwargs go to the conv."""
    seeded(seed)
    klass = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
    conv = klass(in_channels, out_channels, kernel_size, **conv_kwargs)
    with torch.no_grad():
        probe = conv(torch.zeros(1, in_channels, *[size] * dims))
    return ConvNet(conv, probe[0].numel())


class EmbeddingModel(nn.Module):
    """Embedding -> Linear over tokens -> sum over tokens. Input: token ids [B, T]."""

    def __init__(self, vocab: int = 11, dim: int = 4, out_dim: int = 3,
                 padding_idx: Optional[int] = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(ids))).sum(1)


def make_embedding_model(vocab: int = 11, dim: int = 4, out_dim: int = 3,
                         padding_idx: Optional[int] = None, seed: int = 0) -> EmbeddingModel:
    seeded(seed)
    return EmbeddingModel(vocab, dim, out_dim, padding_idx)


class HFConv1DModel(nn.Module):
    """Hugging Face's Conv1D (GPT-2's transposed Linear) -> tanh -> Conv1D; input [B, T, in]."""

    def __init__(self, in_dim: int = 6, hidden: int = 5, out_dim: int = 3) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.fc = Conv1D(hidden, in_dim)
        self.proj = Conv1D(out_dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(torch.tanh(self.fc(x))).sum(1)


def make_hf_conv1d_model(in_dim: int = 6, hidden: int = 5, out_dim: int = 3,
                         seed: int = 0) -> HFConv1DModel:
    seeded(seed)
    model = HFConv1DModel(in_dim, hidden, out_dim)
    with torch.no_grad():  # HF initialises Conv1D with std 0.02 and zero bias: make it lively
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()


def make_tiny_gpt2(seed: int = 0, tie_word_embeddings: bool = False, n_layer: int = 2):
    """GPT2LMHeadModel: 2 layers, width 32, 2 heads, vocab 50, 16 positions, eager attention,
    no dropout. Token 0 doubles as bos/eos/pad."""
    _quiet_transformers()
    from transformers import GPT2Config, GPT2LMHeadModel

    seeded(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0, tie_word_embeddings=tie_word_embeddings,
                        attn_implementation="eager")
    return GPT2LMHeadModel(config)


def make_tiny_bert(seed: int = 0, num_labels: int = 3):
    """BertForSequenceClassification: 2 layers, width 32, 2 heads, vocab 50, eager, no dropout."""
    _quiet_transformers()
    from transformers import BertConfig, BertForSequenceClassification

    seeded(seed)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=48, max_position_embeddings=16,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        num_labels=num_labels, pad_token_id=0, attn_implementation="eager")
    return BertForSequenceClassification(config)


def padded_tokens(lengths, max_len: int, vocab: int = 50, seed: int = 0):
    """Right-padded token ids [B, max_len] (pad = 0, real tokens in 1..vocab-1) and the mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (len(lengths), max_len), generator=g)
    mask = torch.zeros(len(lengths), max_len, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids * mask, mask


# --------------------------------------------------------------------------- gradient helpers
def per_example_grads(model: nn.Module, example_loss: Callable, *batch: Tensor,
                      names: Optional[list] = None) -> Dict[str, Tensor]:
    """Brute force: {param name: [B, *param.shape]} with torch.func.vmap(grad(...)).

    `example_loss(call, *example)` computes ONE example's loss, where `call(*args, **kwargs)`
    runs the model functionally and `example` holds that example's tensors (no batch axis; add
    it back with `x[None]`). Every tensor of `batch` is split along dim 0. `names` restricts the
    parameters differentiated (default: all).
    """
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    wanted = {k: v for k, v in params.items() if names is None or k in names}
    fixed = {k: v for k, v in params.items() if k not in wanted}

    def loss(p, *example):
        def call(*args, **kwargs):
            return functional_call(model, ({**fixed, **p}, buffers), args, kwargs)

        return example_loss(call, *example)

    return vmap(grad(loss), in_dims=(None,) + (0,) * len(batch))(wanted, *batch)


def per_example_grads_loop(model: nn.Module, losses: Tensor,
                           names: Optional[list] = None) -> Dict[str, Tensor]:
    """Brute force without vmap (for models whose forward has data-dependent control flow):
    `losses` [B] are the per-example losses of ONE batched forward; returns {param name:
    [B, *param.shape]}, each example's gradient by its own autograd.grad call."""
    params = {k: p for k, p in model.named_parameters() if names is None or k in names}
    rows = []
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], list(params.values()), retain_graph=True,
                                    allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g
                     for p, g in zip(params.values(), grads)])
    return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(params)}


def gradient_matrix(module: nn.Module, grads: Dict[str, Tensor], prefix: str,
                    include_bias: bool = False) -> Tensor:
    """Per-example [B, out_dim, in_dim] gradient matrix of a tracked layer, in LogIX's convention:
    nn.Linear weight; HF Conv1D and nn.Embedding weight^T; conv weight.reshape(out, -1); the bias
    as one more input column when include_bias."""
    from transformers.pytorch_utils import Conv1D

    w = grads[f"{prefix}weight"]
    if isinstance(module, (nn.Embedding, Conv1D)):
        w = w.transpose(1, 2)
    w = w.reshape(w.shape[0], w.shape[1], -1)
    if include_bias and getattr(module, "bias", None) is not None:
        w = torch.cat([w, grads[f"{prefix}bias"][:, :, None]], 2)
    return w


def project(g: Tensor, p_in: Optional[Tensor], p_out: Optional[Tensor]) -> Tensor:
    """P_out @ g @ P_in^T for g [B, out, in] (None = identity)."""
    if p_out is not None:
        g = p_out @ g
    if p_in is not None:
        g = g @ p_in.T
    return g


def assert_close_scaled(actual: Tensor, expected: Tensor, rtol: float = 1e-4,
                        atol: float = 1e-5) -> None:
    """assert_close with atol scaled to the magnitude of the expected values (float32 round-off
    of sums of many terms grows with their size)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(expected.abs().max()), 1.0)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale)


def log_classifier_steps(run, model: nn.Module, x: Tensor, y: Tensor, batch: int) -> None:
    """Log (x, y) in steps of `batch` ids (0, 1, ...) with a summed cross-entropy, then
    finalize. The run is watched and set up by the caller."""
    from torch.nn import functional as F

    run.save(True)
    for start in range(0, len(x), batch):
        ids = list(range(start, min(start + batch, len(x))))
        with run(data_id=ids):
            F.cross_entropy(model(x[ids]), y[ids], reduction="sum").backward()
    run.finalize()


def log_classifier(run, model: nn.Module, x: Tensor, y: Tensor, batch: int,
                   query_scale: float):
    """`log_classifier_steps`, then log the queries q0-q2 (the first three examples scaled by
    `query_scale`); returns (run, their log)."""
    from torch.nn import functional as F

    log_classifier_steps(run, model, x, y, batch)
    run.eval()
    with run(data_id=["q0", "q1", "q2"]):
        F.cross_entropy(model(x[:3] * query_scale), y[:3], reduction="sum").backward()
    return run, run.get_log(copy=True)


def summed_nll(logits: Tensor, ids: Tensor) -> Tensor:
    """A causal LM's next-token cross-entropy of `ids`, summed over positions and sequences."""
    from torch.nn import functional as F

    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="sum")


def log_token_windows(run, model: nn.Module, windows: Tensor, per_step: int) -> None:
    """Log token windows [n, T] in steps of `per_step` (ids 0, 1, ...) with `summed_nll`,
    finalize, and leave the run in eval mode for queries. Watched and set up by the caller."""
    run.save(True)
    for start in range(0, len(windows), per_step):
        ids = windows[start:start + per_step]
        with run(data_id=list(range(start, start + len(ids)))):
            summed_nll(model(ids).logits, ids).backward()
    run.finalize()
    model.zero_grad()
    run.eval()


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def tmp_root(tmp_path) -> str:
    """A fresh LogIX root_dir (projects are folders below it)."""
    root = tmp_path / "logix_root"
    return str(root)


@pytest.fixture
def new_run(tmp_root):
    """Factory: new_run(project="p", **config_overrides) -> logix.Run rooted in tmp_root."""

    def make(project: str = "p", **overrides) -> logix.Run:
        return logix.init(project, root_dir=tmp_root, **overrides)

    return make


@pytest.fixture(autouse=True)
def _reset_logix_current():
    """Each test starts and ends without a module-level current run."""
    logix._current = None
    yield
    logix._current = None
