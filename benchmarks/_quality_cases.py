"""The cases of quality.py (data, model, training, losses): five synthetic, four on
scikit-learn's bundled data sets (nothing is downloaded).

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

    def __init__(self, data=None) -> None:
        """data: (x, y, qx, qy) as the benchmark made them (a peer worker gets them in its job,
        so its venv needs none of the packages that load them), else made here."""
        self.x, self.y, self.qx, self.qy = self.data() if data is None else data

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

    def optimizer(self, params):
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)

    def train(self, indices, seed, record=None, weights=None):
        """Full-batch training on `indices` with seed `seed`. record(model, optimizer): makes a
        MAGIC recorder (logix.MagicRecorder), told each step's ids and finished at the end.
        weights [N_TRAIN]: per-example data weights, the loss then being
        sum_i w_i loss_i / len(indices) (the single-model ground truth)."""
        torch.manual_seed(seed)
        model = self.model()
        opt = self.optimizer(model.parameters())
        recorder = None if record is None else record(model, opt)
        y = None if self.y is None else self.y[indices]
        for _ in range(self.steps):
            if recorder is not None:
                recorder.record(indices.tolist())
            opt.zero_grad()
            if weights is None:
                self.loss(model, self.x[indices], y, "mean").backward()
            else:
                per = self.per_example_loss(model, self.x[indices], y)
                ((weights[indices] * per).sum() / len(indices)).backward()
            opt.step()
        if recorder is not None:
            recorder.finish()
        return model

    def train_removed(self, indices, seed):
        """The single-model ground truth: the attributed run itself (seed 0, every example in
        the same order) with the examples outside `indices` given weight 0; `seed` is
        ignored."""
        weights = torch.zeros(N_TRAIN)
        weights[indices] = 1.0
        return self.train(torch.arange(N_TRAIN), 0, weights=weights)

    def per_example_batch(self, ids):
        """The batch of these training ids, as `magic_loss` takes it."""
        return self.x[ids], None if self.y is None else self.y[ids]

    def magic_loss(self, model, batch):  # per-example losses [B]
        x, y = batch
        return self.per_example_loss(model, x, y)

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

    def optimizer(self, params):
        return torch.optim.Adam(params, lr=self.lr)


class StagedCase(MLPCase):
    name = "staged"
    # (segment, classes trained on, steps, lr); two checkpoints per stage
    stages = ((0, (0, 1), 150, 0.1), (1, (0, 1, 2, 3), 40, 0.02))

    def train(self, indices, seed, checkpoints=None, record=None, weights=None):
        torch.manual_seed(seed)
        model = self.model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=self.momentum)
        recorder = None if record is None else record(model, opt)
        for segment, classes, steps, lr in self.stages:
            members = self.members(indices, classes)
            for group in opt.param_groups:
                group["lr"] = lr
            for step in range(steps):
                if recorder is not None:
                    recorder.record(members.tolist())
                opt.zero_grad()
                if weights is None:
                    self.loss(model, self.x[members], self.y[members], "mean").backward()
                else:
                    per = self.per_example_loss(model, self.x[members], self.y[members])
                    ((weights[members] * per).sum() / len(members)).backward()
                opt.step()
                if checkpoints is not None and step + 1 in (steps // 2, steps):
                    checkpoints.append((f"s{segment}-{step + 1}", segment, lr, steps,
                                        members.tolist(),
                                        {k: v.clone() for k, v in model.state_dict().items()}))
        if recorder is not None:
            recorder.finish()
        return model

    def members(self, indices, classes):
        keep = torch.isin(self.y[indices], torch.tensor(classes))
        return indices[keep]


class TinyEncoder(nn.Module):
    """One bidirectional self-attention block over token sequences, mean-pooled, then a
    linear classifier."""

    def __init__(self, vocab=16, d=16, length=10, classes=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.1)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):  # [B, T] -> [B, classes]
        h = self.embed(ids) + self.pos[:ids.shape[-1]]
        att = self.q(h) @ self.k(h).transpose(-1, -2) / math.sqrt(h.shape[-1])
        h = h + self.o(att.softmax(-1) @ self.v(h))
        h = h + self.down(torch.tanh(self.up(h)))
        return self.head(h.mean(-2))


class AttnCase(Case):
    """Sequences of 10 tokens (vocabulary 16); each class has 3 marker tokens, and every
    position is a marker of its class with probability 0.25, else uniform; 10% label noise."""
    name = "attn"
    steps, lr = 150, 0.01

    def data(self):
        g = torch.Generator().manual_seed(3)
        n, length, vocab = N_TRAIN + N_QUERY, 10, 16
        markers = torch.randperm(vocab, generator=g)[:12].view(4, 3)
        y = torch.randint(0, 4, (n,), generator=g)
        noise = torch.randint(0, vocab, (n, length), generator=g)
        pick = markers[y][torch.arange(n)[:, None], torch.randint(0, 3, (n, length),
                                                                   generator=g)]
        x = torch.where(torch.rand(n, length, generator=g) < 0.25, pick, noise)
        flip = torch.rand(n, generator=g) < 0.1
        y = torch.where(flip, torch.randint(0, 4, y.shape, generator=g), y)
        return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]

    def model(self):
        return TinyEncoder()

    def optimizer(self, params):
        return torch.optim.Adam(params, lr=self.lr)


def sklearn_split(load, seed):
    """N_TRAIN training and N_QUERY query examples drawn (seeded) from a scikit-learn data set
    bundled with the package; scikit-learn is imported here only (the peer venvs lack it)."""
    from sklearn import datasets

    data = getattr(datasets, load)()
    x, y = torch.tensor(data.data, dtype=torch.float32), torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, query = order[:N_TRAIN], order[N_TRAIN:N_TRAIN + N_QUERY]
    return x[train], y[train], x[query], y[query]


def standardised(x, qx):
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    return (x - mean) / scale, (qx - mean) / scale


class BreastCancerCase(Case):
    """Wisconsin breast cancer (30 features, 2 classes), standardised on the training part;
    MLP 30-32-32-2 (tanh)."""
    name = "breast_cancer"

    def data(self):
        x, y, qx, qy = sklearn_split("load_breast_cancer", 3)
        x, qx = standardised(x, qx)
        return x, y, qx, qy

    def model(self):
        return nn.Sequential(nn.Linear(30, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                             nn.Linear(32, 2))


class DigitsCase(Case):
    """scikit-learn's 8x8 handwritten digits (10 classes, pixels scaled to [0, 1]);
    Conv2d(1,6,3) -> Conv2d(6,8,3) -> Linear(128,10)."""
    name = "digits"
    steps, lr = 150, 0.05

    def data(self):
        x, y, qx, qy = sklearn_split("load_digits", 4)
        return (x / 16).reshape(-1, 1, 8, 8), y, (qx / 16).reshape(-1, 1, 8, 8), qy

    def model(self):
        return nn.Sequential(nn.Conv2d(1, 6, 3), nn.Tanh(), nn.Conv2d(6, 8, 3), nn.Tanh(),
                             nn.Flatten(), nn.Linear(128, 10))


class DigitsEarlyCase(DigitsCase):
    """digits stopped short of convergence: 20 of the 150 Adam steps (a case held out of the
    `ggn` / `hessian` damping rule's fit)."""
    name = "digits_early"
    steps = 20


class DigitsMLPCase(DigitsCase):
    """digits as 64 pixel features (scaled to [0, 1]) into an MLP 64-32-32-10 (tanh), SGD
    (a case held out of the `ggn` / `hessian` damping rule's fit)."""
    name = "digits_mlp"
    steps, lr = 200, 0.1
    split_seed = 5  # which examples sklearn_split draws

    def data(self):
        x, y, qx, qy = sklearn_split("load_digits", self.split_seed)
        return x / 16, y, qx / 16, qy

    def model(self):
        return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                             nn.Linear(32, 10))

    def optimizer(self, params):
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)


class DiabetesCase(Case):
    """scikit-learn's diabetes table (10 features), its disease-progression target cut into
    tertiles (3 classes, a noisy task); MLP 10-32-32-3 (ReLU), Adam. Held out of the `ggn` /
    `hessian` damping rule's fit, like the four cases below."""
    name = "diabetes3"
    steps, lr = 150, 0.01

    def data(self):
        from sklearn import datasets

        raw = datasets.load_diabetes()
        x = torch.tensor(raw.data, dtype=torch.float32)
        target = torch.tensor(raw.target, dtype=torch.float32)
        y = torch.bucketize(target, torch.quantile(target, torch.tensor([1 / 3, 2 / 3])))
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(8))
        train, query = order[:N_TRAIN], order[N_TRAIN:N_TRAIN + N_QUERY]
        x, qx = standardised(x[train], x[query])
        return x, y[train], qx, y[query]

    def model(self):
        return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                             nn.Linear(32, 3))

    def optimizer(self, params):
        return torch.optim.Adam(params, lr=self.lr)


class MoonsCase(Case):
    """Two interleaved half-moons (scikit-learn's make_moons, noise 0.3, seeded); MLP 2-32-32-2
    (tanh), SGD with momentum for 300 steps."""
    name = "moons"
    steps = 300

    def data(self):
        from sklearn import datasets

        x, y = datasets.make_moons(N_TRAIN + N_QUERY, noise=0.3, random_state=7)
        x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
        return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]

    def model(self):
        return nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                             nn.Linear(32, 2))


class BreastCancerAdamWCase(BreastCancerCase):
    """breast_cancer drawn with another seed into a narrower ReLU MLP (30-16-16-2), AdamW with
    weight decay 0.05 for 100 steps. It gets every query right, most so confidently that their
    float32 losses are 0 in every retraining: the LDS counts only those whose loss varies
    (about 17 of 40)."""
    name = "bc_adamw"
    steps, lr = 100, 0.01

    def data(self):
        x, y, qx, qy = sklearn_split("load_breast_cancer", 11)
        x, qx = standardised(x, qx)
        return x, y, qx, qy

    def model(self):
        return nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                             nn.Linear(16, 2))

    def optimizer(self, params):
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.05)


class DigitsReLUCase(DigitsMLPCase):
    """digits pixels drawn with another seed into a one-hidden-layer ReLU MLP (64-48-10), Adam
    for 60 steps."""
    name = "digits_relu"
    steps, lr = 60, 0.005
    split_seed = 6

    def model(self):
        return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))

    def optimizer(self, params):
        return torch.optim.Adam(params, lr=self.lr)


CASES = {c.name: c for c in (MLPCase, CNNCase, LMCase, StagedCase, AttnCase,
                             BreastCancerCase, DigitsCase, DigitsEarlyCase, DigitsMLPCase,
                             DiabetesCase, MoonsCase, BreastCancerAdamWCase, DigitsReLUCase)}
