"""The four synthetic cases of quality.py (data, model, training, losses).

Only torch is imported, not `logix`: the LogIX 0.1.1 peer worker (_peer_logix.py) imports this
module under the peer venv, where `logix` is the original package.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

N_TRAIN, N_QUERY = 240, 40


class Case:
    name = ""
    steps, lr, momentum = 200, 0.1, 0.9

    def __init__(self) -> None:
        self.x, self.y, self.qx, self.qy = self.data()

    def loss(self, model, x, y, reduction="sum"):
        return F.cross_entropy(model(x), y, reduction=reduction)

    def per_example_loss(self, model, x, y):
        return F.cross_entropy(model(x), y, reduction="none")

    def logits(self, model, x):  # [..., classes]
        return model(x)

    def sampled_loss(self, model, x, generator):
        """The summed loss with labels drawn from the model's own predictions: its gradients'
        covariance is the true Fisher (the empirical Fisher uses the data's labels)."""
        logits = self.logits(model, x).flatten(0, -2)  # [examples (x tokens), classes]
        with torch.no_grad():
            labels = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
        return F.cross_entropy(logits, labels, reduction="sum")

    def margin(self, model, x, y):
        logits = model(x)
        true = logits.gather(1, y[:, None])[:, 0]
        other = logits.scatter(1, y[:, None], -math.inf).max(1).values
        return true - other

    def train(self, indices, seed):
        torch.manual_seed(seed)
        model = self.model()
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum)
        for _ in range(self.steps):
            opt.zero_grad()
            self.loss(model, self.x[indices], self.y[indices], "mean").backward()
            opt.step()
        return model

    def eval_loss(self, model):
        with torch.no_grad():
            return self.per_example_loss(model, self.qx, self.qy)

    def eval_margin(self, model):
        with torch.no_grad():
            return self.margin(model, self.qx, self.qy)


def gaussian_tabular(seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 16, generator=g) * 1.2
    y = torch.randint(0, 4, (N_TRAIN + N_QUERY,), generator=g)
    x = centers[y] + torch.randn(N_TRAIN + N_QUERY, 16, generator=g) * 1.5
    flip = torch.rand(N_TRAIN + N_QUERY, generator=g) < 0.1
    y = torch.where(flip, torch.randint(0, 4, y.shape, generator=g), y)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


class MLPCase(Case):
    name = "mlp"

    def data(self):
        return gaussian_tabular()

    def model(self):
        return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                             nn.Linear(32, 4))


class CNNCase(Case):
    name = "cnn"
    steps, lr = 150, 0.05

    def data(self):
        g = torch.Generator().manual_seed(1)
        patterns = (torch.rand(4, 1, 8, 8, generator=g) > 0.6).float()
        n = N_TRAIN + N_QUERY
        y = torch.randint(0, 4, (n,), generator=g)
        shift = torch.randint(-1, 2, (n,), generator=g)
        x = torch.stack([torch.roll(patterns[c], int(s), dims=2) for c, s in zip(y, shift)])
        x = x + torch.randn(x.shape, generator=g) * 0.8
        return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]

    def model(self):
        return nn.Sequential(nn.Conv2d(1, 6, 3), nn.Tanh(), nn.Conv2d(6, 8, 3), nn.Tanh(),
                             nn.Flatten(), nn.Linear(128, 4))


class TinyLM(nn.Module):
    def __init__(self, vocab=12, d=24, length=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.1)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down, self.head = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Linear(d,
                                                                                         vocab)

    def forward(self, ids):  # [B, T] -> [B, T, vocab]
        h = self.embed(ids) + self.pos[:ids.shape[1]]
        att = self.q(h) @ self.k(h).transpose(1, 2) / math.sqrt(h.shape[-1])
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).triu(1)
        h = h + self.o(att.masked_fill(causal, -math.inf).softmax(-1) @ self.v(h))
        h = h + self.down(torch.tanh(self.up(h)))
        return self.head(h)


class LMCase(Case):
    name = "lm"
    steps, lr = 120, 0.01

    def data(self):
        g = torch.Generator().manual_seed(2)
        n, length = N_TRAIN + N_QUERY, 12
        transition = torch.rand(12, 12, generator=g) ** 4  # a sparse Markov grammar
        seqs = torch.zeros(n, length, dtype=torch.long)
        seqs[:, 0] = torch.randint(0, 12, (n,), generator=g)
        for t in range(1, length):
            seqs[:, t] = torch.multinomial(transition[seqs[:, t - 1]], 1, generator=g)[:, 0]
        return seqs[:N_TRAIN], None, seqs[N_TRAIN:], None

    def model(self):
        return TinyLM()

    def logits(self, model, x):  # next-token logits [B, T - 1, vocab]
        return model(x[:, :-1])

    def per_example_loss(self, model, x, y):
        logits = model(x[:, :-1])
        return F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").sum(1)

    def loss(self, model, x, y, reduction="sum"):
        per = self.per_example_loss(model, x, y)
        return per.sum() if reduction == "sum" else per.mean()

    def margin(self, model, x, y):  # the last token's prediction
        logits = model(x[:, :-1])[:, -1]
        target = x[:, -1]
        true = logits.gather(1, target[:, None])[:, 0]
        return true - logits.scatter(1, target[:, None], -math.inf).max(1).values

    def train(self, indices, seed):
        torch.manual_seed(seed)
        model = self.model()
        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        for _ in range(self.steps):
            opt.zero_grad()
            self.loss(model, self.x[indices], None, "mean").backward()
            opt.step()
        return model


class StagedCase(MLPCase):
    name = "staged"
    # (segment, classes trained on, steps, lr); two checkpoints per stage
    stages = ((0, (0, 1), 150, 0.1), (1, (0, 1, 2, 3), 40, 0.02))

    def train(self, indices, seed, checkpoints=None):
        torch.manual_seed(seed)
        model = self.model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=self.momentum)
        for segment, classes, steps, lr in self.stages:
            members = self.members(indices, classes)
            for group in opt.param_groups:
                group["lr"] = lr
            for step in range(steps):
                opt.zero_grad()
                self.loss(model, self.x[members], self.y[members], "mean").backward()
                opt.step()
                if checkpoints is not None and step + 1 in (steps // 2, steps):
                    checkpoints.append((f"s{segment}-{step + 1}", segment, lr, steps,
                                        members.tolist(),
                                        {k: v.clone() for k, v in model.state_dict().items()}))
        return model

    def members(self, indices, classes):
        keep = torch.isin(self.y[indices], torch.tensor(classes))
        return indices[keep]


CASES = {c.name: c for c in (MLPCase, CNNCase, LMCase, StagedCase)}
