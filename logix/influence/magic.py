"""MAGIC: exact attribution of a replayable training run by metagradients (Ilyas & Engstrom,
"MAGIC: Near-Optimal Data Attribution for Deep Learning", 2025).

Training is a map from per-example data weights w (all 1) to the final parameters: step t
trains on the batch B_t with the loss reduce_i(w_i * loss_i(theta_t)) ("mean": sum / |B_t|,
"sum") and updates the state s_t = (theta_t, optimizer state) to s_{t+1} = U_t(s_t, w). For a
query loss Q(theta_T), the metagradient dQ/dw_i is exact reverse-mode differentiation through
every step:

    a_T = (dQ/dtheta_T, 0)                                   adjoint of the final state
    a_t = a_{t+1} . dU_t/ds_t,   dQ/dw_i += a_{t+1} . dU_t/dw_i   for i in B_t, t = T-1 .. 0

Each vector-Jacobian product goes through the optimizer's update and through the training
gradient (a Hessian-vector product), with torch.func, batched over the queries (vmap). The
states s_t are recomputed from the recorded checkpoints (`logix.storage.replay`): segment by
segment from the last, each segment replayed forward from its checkpoint and then reversed.
The score is score[q, i] = -dQ_q/dw_i: positive means up-weighting example i lowers the query's
loss (helpful), as for every other estimator.

Memory (in states s = parameters + optimizer state; checkpoint interval k, T steps, n queries):
T/k + 1 checkpoints on disk; in memory, schedule="store" holds the k + 1 states of one segment
(k + 1 forward steps per segment, about T forward steps in all: one replay of training),
schedule="bisect" holds at most log2(k) + 2 states (a binary REPLAY-style recursion: each step
forward about log2(k) times); plus the adjoint, n states wide.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from logix.errors import UsageError
from logix.influence.results import Scores
from logix.progress import progress_bar
from logix.storage.data_ids import normalize_data_ids
from logix.storage.replay import (REPLAY_DIR, MagicRecorder, ReplayRecord,  # noqa: F401
                                  load_record)

SCHEDULES = ("store", "bisect")
Params = Dict[str, Tensor]
States = Dict[str, Dict[str, Tensor]]


class _Bound(nn.Module):
    """`fn(model, batch)` as a module, so torch.func.functional_call can swap model's
    parameters (names "model.<name>") without touching the user's model."""

    def __init__(self, model: nn.Module, fn: Callable) -> None:
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, batch):
        return self.fn(self.model, batch)


def magic_scores(record: Any, model: nn.Module, loss_fn: Callable, get_batch: Callable,
                 query_batch: Any, query_loss_fn: Optional[Callable] = None,
                 query_ids: Optional[Sequence] = None, schedule: str = "store",
                 tolerance: Optional[float] = None, progress: bool = True) -> dict:
    """Metagradient scores of a batch of queries against every example of a recorded run.

    record: the folder a `MagicRecorder` wrote, a project folder holding it in `replay/`, or a
    loaded `ReplayRecord`. model: the trained architecture; the parameters the optimizer trained
    come from the run's checkpoints, the others (frozen ones) and buffers from `model`, which
    is not changed.
    loss_fn(model, batch) -> Tensor[B]: the per-example training losses, as during training.
    get_batch(ids) -> batch: the training batch of these data ids (the same content and order
    the run trained on). query_batch: the queries' batch; query_loss_fn(model, query_batch) ->
    Tensor[n_query] (default loss_fn). query_ids: the queries' ids (default 0..n-1).
    schedule: "store" (one segment of states in memory) or "bisect" (log2 of it, more
    recomputation); see the module doc. tolerance: the largest relative difference allowed
    between the losses of a replayed state and of the recorded checkpoint it must reproduce,
    on the batch of the checkpoint's last step (default 1e-9 in float64, 1e-4 in lower
    precision); a larger one means the replay is not the recorded run (another loss_fn,
    get_batch or model, or non-deterministic training) and raises UsageError.

    Returns {"influence" [n_query, n_train] float64, "src_ids", "tgt_ids" (training ids in
    order of first use), "meta"}; influence[q, i] = -dQ_q/dw_i (> 0: helpful). meta holds
    the cost: steps, replayed forward steps, seconds, states held and their bytes, and the
    peak memory (CUDA: this call's; CPU: the process's peak resident memory so far).
    """
    if schedule not in SCHEDULES:
        raise UsageError(f"schedule must be one of {SCHEDULES}, got {schedule!r}.")
    rec = record if isinstance(record, ReplayRecord) else load_record(record)
    started = time.perf_counter()
    replay = _Replay(rec, model, loss_fn, get_batch)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    final_params, final_states = rec.load_checkpoint(rec.checkpoints[-1])
    final_params = replay.to_device(final_params)
    query_fn = _Bound(model, query_loss_fn or loss_fn)
    names = list(final_params)

    def query_losses(params: Params) -> Tensor:
        return torch.func.functional_call(query_fn, _prefixed(params), (query_batch,))

    with torch.no_grad():
        shape = tuple(query_losses(final_params).shape)
    if len(shape) != 1:
        raise UsageError(f"query_loss_fn(model, query_batch) must return one loss per query "
                         f"(a 1-D tensor), got shape {shape}.")
    n_query = shape[0]
    src_ids = list(range(n_query)) if query_ids is None else normalize_data_ids(query_ids)
    if len(src_ids) != n_query:
        raise UsageError(f"query_ids has {len(src_ids)} ids for {n_query} query losses.")
    # adjoint of theta_T: one row per query; of the optimizer state: zero
    adj_params = torch.func.jacrev(query_losses)(final_params)  # {name: [n_query, *shape]}
    adj_states = {n: {k: torch.zeros((n_query,) + v.shape, dtype=v.dtype, device=replay.device)
                      for k, v in s.items() if v.dim() > 0}
                  for n, s in final_states.items()}

    columns: Dict[Any, int] = {}
    for step in rec.steps:
        for i in step["ids"]:
            columns.setdefault(i, len(columns))
    scores = torch.zeros(n_query, len(columns), dtype=torch.float64)
    tol = tolerance if tolerance is not None else \
        (1e-9 if final_params[names[0]].dtype == torch.float64 else 1e-4)

    replay.tol = tol
    bounds = list(zip(rec.checkpoints[:-1], rec.checkpoints[1:]))
    with progress_bar(len(rec.steps), "MAGIC replay", enabled=progress) as advance:
        adjoint = (adj_params, adj_states)
        for start, stop in reversed(bounds):
            params, states = rec.load_checkpoint(start)
            state = (replay.to_device(params), replay.to_device_states(states))
            replay.check(state, start, stop, schedule)
            adjoint = replay.reverse(state, start, stop, adjoint, scores, columns, schedule,
                                     advance)

    meta = {"method": "magic", "steps": len(rec.steps), "every": rec.every,
            "checkpoints": len(rec.checkpoints), "schedule": schedule,
            "optimizer": rec.kind, "reduction": rec.reduction,
            "forward_steps": replay.forward_steps, "backward_steps": len(rec.steps),
            "replays": replay.forward_steps / len(rec.steps),
            "seconds": time.perf_counter() - started,
            "states_held": replay.most_held, "state_bytes": replay.state_bytes,
            "adjoint_bytes": replay.state_bytes * n_query,
            "replay_error": replay.worst_error, "replay_drift": replay.worst_drift,
            "tolerance": tol}
    if torch.cuda.is_available() and replay.device.type == "cuda":
        meta["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    else:  # the process's peak resident memory so far (not this call's alone)
        meta["process_peak_rss_bytes"] = _peak_rss()
    return Scores(influence=scores, src_ids=src_ids, tgt_ids=list(columns), meta=meta)


def _peak_rss() -> Optional[int]:
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _prefixed(params: Params) -> Params:
    return {f"model.{n}": p for n, p in params.items()}


class _Replay:
    """Forward steps and batched vector-Jacobian products of one recorded run."""

    def __init__(self, rec: ReplayRecord, model: nn.Module, loss_fn: Callable,
                 get_batch: Callable) -> None:
        self.rec, self.get_batch = rec, get_batch
        self.bound = _Bound(model, loss_fn)
        self.device = next(model.parameters()).device
        self.update = _UPDATES[rec.kind]
        self.group_of = {n: g["hparams"] for g in rec.groups for n in g["params"]}
        self.group_index = {n: k for k, g in enumerate(rec.groups) for n in g["params"]}
        self.forward_steps, self.held, self.most_held = 0, 0, 0
        self.state_bytes, self.worst_error, self.worst_drift, self.tol = 0, 0.0, 0.0, 0.0

    def to_device(self, params: Params) -> Params:
        return {n: p.to(self.device) for n, p in params.items()}

    def to_device_states(self, states: States) -> States:
        return {n: {k: v.to(self.device) for k, v in s.items()} for n, s in states.items()}

    # ------------------------------------------------------------------ one step
    def _batch(self, t: int):
        ids = self.rec.steps[t]["ids"]
        return ids, self.get_batch(ids)

    def _step_fn(self, t: int, batch):
        """(params, differentiable optimizer state, batch weights) -> the next (params, state)."""
        lrs = self.rec.steps[t]["lr"]
        reduction = self.rec.reduction

        def train_loss(params, weights):
            losses = torch.func.functional_call(self.bound, _prefixed(params), (batch,))
            if losses.dim() != 1 or losses.shape[0] != weights.shape[0]:
                raise UsageError(f"loss_fn(model, batch) must return one loss per example "
                                 f"(shape [{weights.shape[0]}]), got {tuple(losses.shape)}.")
            total = (weights * losses).sum()
            return total / weights.shape[0] if reduction == "mean" else total

        def step(params, states, counts, weights):
            grads = torch.func.grad(train_loss)(params, weights)
            new_params, new_states = {}, {}
            for n, p in params.items():
                new_params[n], new_states[n] = self.update(
                    p, grads[n], states[n], counts[n], lrs[self.group_index[n]], self.group_of[n])
            return new_params, new_states

        return step

    @staticmethod
    def _split(states: States):
        """Differentiable state (tensors with a shape) and step counts (Adam's "step")."""
        diff = {n: {k: v for k, v in s.items() if v.dim() > 0} for n, s in states.items()}
        counts = {n: s.get("step") for n, s in states.items()}
        return diff, counts

    def forward(self, state, t: int):
        params, states = state
        diff, counts = self._split(states)
        ids, batch = self._batch(t)
        weights = torch.ones(len(ids), dtype=next(iter(params.values())).dtype,
                             device=self.device)
        new_params, new_diff = self._step_fn(t, batch)(params, diff, counts, weights)
        self.forward_steps += 1
        new_params = {n: p.detach() for n, p in new_params.items()}
        for n, s in new_diff.items():
            s = {k: v.detach() for k, v in s.items()}
            if counts[n] is not None or self.rec.kind != "sgd":
                s["step"] = _next_count(counts[n], s)
            new_diff[n] = s
        return new_params, new_diff

    def vjp(self, state, t: int, adjoint, scores: Tensor, columns: Dict) -> tuple:
        params, states = state
        diff, counts = self._split(states)
        ids, batch = self._batch(t)
        weights = torch.ones(len(ids), dtype=next(iter(params.values())).dtype,
                             device=self.device)
        step = self._step_fn(t, batch)
        _, pullback = torch.func.vjp(lambda p, s, w: step(p, s, counts, w), params, diff,
                                     weights)
        adj_params, adj_states = adjoint
        # the cotangent of the output state has the output's structure (SGD's first step
        # creates the momentum buffers; their adjoint is then used)
        adj_out = {n: {k: v for k, v in adj_states[n].items() if k != "step"}
                   for n in adj_states}
        out_keys = self._out_keys(diff)
        adj_out = {n: {k: adj_out[n].get(k, _zeros_like_batched(params[n], adj_params[n]))
                       for k in out_keys[n]} for n in params}
        d_params, d_states, d_weights = torch.func.vmap(pullback)((adj_params, adj_out))
        index = torch.tensor([columns[i] for i in ids])
        scores.index_add_(1, index, -d_weights.detach().to("cpu", torch.float64))
        return ({n: v.detach() for n, v in d_params.items()},
                {n: {k: v.detach() for k, v in s.items()} for n, s in d_states.items()})

    def _out_keys(self, diff: States) -> Dict[str, List[str]]:
        """The optimizer-state entries a step returns, per parameter."""
        if self.rec.kind != "sgd":
            return {n: ["exp_avg", "exp_avg_sq"] for n in diff}
        return {n: ["momentum_buffer"] if self.group_of[n]["momentum"] != 0 else []
                for n in diff}

    # ------------------------------------------------------------------ segments
    def _hold(self, n: int) -> None:
        self.held += n
        self.most_held = max(self.most_held, self.held)

    def check(self, state, start: int, stop: int, schedule: str) -> None:
        """Replay start -> stop and compare with the checkpoint at stop (schedule "bisect" only;
        "store" compares in `reverse`, where it replays the segment anyway)."""
        if self.state_bytes == 0:
            self.state_bytes = _bytes(state)
        if schedule != "bisect":
            return
        s = state
        for t in range(start, stop):
            s = self.forward(s, t)
        self._compare(s, stop, self.tol)

    def _compare(self, state, step: int, tol: float) -> None:
        """Compare a replayed state with the recorded checkpoint at `step`. Refused (above
        `tol`): the relative difference of the per-example losses of the segment's last batch
        under the two states. Only reported (meta "replay_drift"): ||replayed - recorded|| /
        ||recorded|| over all parameters, and over each optimizer-state entry; a parameter the
        loss does not depend on (an attention key bias) takes rounding-noise steps of size lr
        under Adam, so the weights can drift apart where the model does not."""
        params, states = self.rec.load_checkpoint(step)
        pairs: Dict[str, List[tuple]] = {"param": []}
        for n, p in params.items():
            pairs["param"].append((state[0][n], p))
            for k, v in states[n].items():
                if v.dim() > 0 and k in state[1][n]:
                    pairs.setdefault(k, []).append((state[1][n][k], v))
        drift = 0.0
        for found in pairs.values():
            diff = sum(float((got - want.to(got.device, got.dtype)).double().square().sum())
                       for got, want in found)
            size = sum(float(want.double().square().sum()) for _, want in found)
            drift = max(drift, math.sqrt(diff / max(size, 1e-300)))
        self.worst_drift = max(self.worst_drift, drift)
        # the refusal compares what the model computes: the losses of the segment's last batch
        _, batch = self._batch(step - 1)
        with torch.no_grad():
            got = self._losses(state[0], batch).double()
            want = self._losses(self.to_device(params), batch).double()
        worst = float((got - want).norm() / want.norm().clamp_min(1e-300))
        self.worst_error = max(self.worst_error, worst)
        if not worst <= tol:
            raise UsageError(
                f"Replaying the recorded run does not reproduce its checkpoint at step {step}: "
                f"the losses of its last batch differ by {worst:.3g} (relative) > tolerance "
                f"{tol:g}. loss_fn, get_batch or the model differ from training (the "
                f"per-example losses, reduction {self.rec.reduction!r}, batch contents in the "
                "recorded order), or training was not deterministic.")

    def _losses(self, params: Params, batch) -> Tensor:
        return torch.func.functional_call(self.bound, _prefixed(params), (batch,))

    def reverse(self, state, start: int, stop: int, adjoint, scores, columns, schedule,
                advance) -> tuple:
        if schedule == "store":
            held = [state]
            self._hold(1)
            for t in range(start, stop):
                held.append(self.forward(held[-1], t))
                self._hold(1)
            self._compare(held.pop(), stop, self.tol)
            self.held -= 1
            for t in range(stop - 1, start - 1, -1):
                adjoint = self.vjp(held.pop(), t, adjoint, scores, columns)
                self.held -= 1
                advance()
            return adjoint
        return self._bisect(state, start, stop, adjoint, scores, columns, advance)

    def _bisect(self, state, start, stop, adjoint, scores, columns, advance) -> tuple:
        self._hold(1)
        if stop - start == 1:
            adjoint = self.vjp(state, start, adjoint, scores, columns)
            advance()
        else:
            mid = (start + stop) // 2
            s = state
            for t in range(start, mid):
                s = self.forward(s, t)
            adjoint = self._bisect(s, mid, stop, adjoint, scores, columns, advance)
            del s
            adjoint = self._bisect(state, start, mid, adjoint, scores, columns, advance)
        self.held -= 1
        return adjoint


def _zeros_like_batched(param: Tensor, batched: Tensor) -> Tensor:
    return torch.zeros((batched.shape[0],) + param.shape, dtype=param.dtype,
                       device=param.device)


def _bytes(state) -> int:
    params, states = state
    return sum(p.numel() * p.element_size() for p in params.values()) + \
        sum(v.numel() * v.element_size() for s in states.values() for v in s.values())


def _next_count(count: Optional[Tensor], state: Dict[str, Tensor]) -> Tensor:
    if count is None:
        return torch.tensor(1.0)
    return count + 1


# ---------------------------------------------------------------------- update rules
def _sgd(p: Tensor, g: Tensor, state: Dict[str, Tensor], count, lr: float, hp: dict):
    """torch.optim.SGD's step (maximize=False), as a function."""
    d = g + hp["weight_decay"] * p if hp["weight_decay"] != 0 else g
    new = {}
    if hp["momentum"] != 0:
        buf = state.get("momentum_buffer")
        buf = d if buf is None else hp["momentum"] * buf + (1 - hp["dampening"]) * d
        new["momentum_buffer"] = buf
        d = d + hp["momentum"] * buf if hp["nesterov"] else buf
    return p - lr * d, new


def _adam(decoupled: bool):
    def update(p: Tensor, g: Tensor, state: Dict[str, Tensor], count, lr: float, hp: dict):
        """torch.optim.Adam / AdamW's step (amsgrad=False, maximize=False), as a function."""
        beta1, beta2 = hp["betas"]
        step = 1.0 if count is None else float(count) + 1
        if hp["weight_decay"] != 0:
            if decoupled:
                p = p * (1 - lr * hp["weight_decay"])
            else:
                g = g + hp["weight_decay"] * p
        m = state.get("exp_avg", torch.zeros_like(p))
        v = state.get("exp_avg_sq", torch.zeros_like(p))
        m = m + (1 - beta1) * (g - m)
        v = beta2 * v + (1 - beta2) * g * g
        bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
        denom = _safe_sqrt(v) / math.sqrt(bias2) + hp["eps"]
        return p - (lr / bias1) * m / denom, {"exp_avg": m, "exp_avg_sq": v}
    return update


def _safe_sqrt(v: Tensor) -> Tensor:
    """sqrt with a zero (not infinite) derivative where v == 0 (a parameter never trained)."""
    positive = v > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, v, torch.ones_like(v))),
                       torch.zeros_like(v))


_UPDATES = {"sgd": _sgd, "adam": _adam(False), "adamw": _adam(True)}
