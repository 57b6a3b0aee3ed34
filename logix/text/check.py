"""A configuration check for language models: one sequence logged as it is, padded on the
right, padded on the left, and under each attention implementation must give the same row;
a layer whose part of the row differs is named (`logix check`, `check_consistency`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logix.errors import UsageError
from logix.text.queries import _logits
from logix.tracking.frozen import frozen

ATTENTION = ("eager", "sdpa")


@dataclass
class ConsistencyReport:
    """Per variant and watched layer, the relative difference ||row - reference|| / ||reference||
    against the unpadded sequence under the model's own attention implementation."""

    reference: str
    tolerance: float
    differences: Dict[str, Dict[str, float]] = field(default_factory=dict)  # variant -> layer
    skipped: Dict[str, str] = field(default_factory=dict)  # variant -> why

    @property
    def failures(self) -> List[tuple]:
        """(variant, layer, difference) above the tolerance."""
        return [(variant, layer, d) for variant, layers in self.differences.items()
                for layer, d in layers.items() if not d <= self.tolerance]

    @property
    def ok(self) -> bool:
        return not self.failures

    def render(self) -> str:
        lines = [f"reference: {self.reference}; tolerance {self.tolerance:g} (relative)"]
        for variant, layers in self.differences.items():
            worst = max(layers.items(), key=lambda item: item[1])
            bad = [layer for layer, d in layers.items() if not d <= self.tolerance]
            verdict = "same rows" if not bad else f"DIFFERENT in {len(bad)} layers: {bad[:6]}" \
                + (" ..." if len(bad) > 6 else "")
            lines.append(f"{variant:<24} {verdict} (largest difference {worst[1]:.2e}, "
                         f"{worst[0]})")
        lines += [f"{variant:<24} skipped: {why}" for variant, why in self.skipped.items()]
        return "\n".join(lines)


def check_consistency(run, model: nn.Module, token_ids: Sequence[int], pad_id: int = 0,
                      pad: int = 4, attention: Optional[Sequence[str]] = None,
                      tolerance: float = 1e-4) -> ConsistencyReport:
    """Log `token_ids` (one sequence, summed next-token loss over its real tokens) unpadded,
    right-padded and left-padded by `pad` tokens of `pad_id` (with the attention mask, and
    position ids where the model takes them), under each attention implementation of
    `attention` (default: eager and sdpa); compare every watched layer's part of the row with
    the unpadded sequence under the model's own implementation. The run must be in query mode
    (`run.eval()`); nothing is written, the model is restored."""
    if run.saving:
        raise UsageError("check_consistency() would write into the training log: call "
                         "run.eval() first.")
    tokens = torch.as_tensor(list(token_ids), dtype=torch.long)
    if tokens.dim() != 1 or len(tokens) < 2:
        raise UsageError("check_consistency() needs one sequence of at least two token ids.")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 1:
        raise UsageError(f"pad must be a positive integer, got {pad!r}.")
    config = getattr(model, "config", None)
    own = getattr(config, "_attn_implementation", None)
    report = ConsistencyReport(f"unpadded, attention {own or 'of the model'}", tolerance)
    device = next(model.parameters()).device
    variants = _padded(tokens, pad_id, pad)
    was_training = model.training
    model.eval()
    try:
        with frozen(model), torch.enable_grad():
            reference = _rows(run, model, *variants["unpadded"], device)
            for name, inputs in variants.items():
                if name != "unpadded":
                    report.differences[name] = _differences(reference,
                                                            _rows(run, model, *inputs, device))
            for implementation in attention or ATTENTION:
                name = f"attention {implementation}"
                if config is None or implementation == own:
                    continue
                try:
                    config._attn_implementation = implementation
                    rows = _rows(run, model, *variants["unpadded"], device)
                except (ValueError, ImportError, RuntimeError) as e:
                    report.skipped[name] = f"{type(e).__name__}: {str(e)[:120]}"
                    continue
                finally:
                    config._attn_implementation = own
                report.differences[name] = _differences(reference, rows)
    finally:
        model.train(was_training)
    return report


def _padded(tokens: Tensor, pad_id: int, pad: int) -> Dict[str, tuple]:
    """variant -> (input ids [1, T], attention mask [1, T], position ids or None)."""
    n = len(tokens)
    fill = torch.full((pad,), pad_id, dtype=torch.long)
    ones, zeros = torch.ones(n, dtype=torch.long), torch.zeros(pad, dtype=torch.long)
    left_mask = torch.cat([zeros, ones])
    return {
        "unpadded": (tokens[None], ones[None], None),
        "right-padded": (torch.cat([tokens, fill])[None], torch.cat([ones, zeros])[None], None),
        "left-padded": (torch.cat([fill, tokens])[None], left_mask[None],
                        (left_mask.cumsum(0) - 1).clamp(min=0)[None]),
    }


def _rows(run, model, ids: Tensor, mask: Tensor, positions: Optional[Tensor], device) -> dict:
    ids, mask = ids.to(device), mask.to(device)
    positions = None if positions is None else positions.to(device)
    with run(data_id=["check"], mask=mask):
        logits = _logits(model, ids, mask, positions)
        real = (mask[:, 1:] * mask[:, :-1]).float()  # a real token predicted from a real one
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:],
                              reduction="none")
        (nll * real).sum().backward()
    log = run.get_log(copy=True)
    return {m.name: log.module(m.name).double() for m in log.modules}


def _differences(reference: dict, rows: dict) -> Dict[str, float]:
    out = {}
    for name, want in reference.items():
        scale = want.norm().item()
        out[name] = (rows[name] - want).norm().item() / scale if scale else \
            rows[name].norm().item()
    return out
