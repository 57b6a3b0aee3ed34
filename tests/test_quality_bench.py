"""benchmarks/quality.py's seed handling: each seed draws its own subsets and retrains with its
own seed, in a cache of its own; and the paired significance test over seeds."""

import torch

from benchmarks import quality


class LinearCase:
    """Ridge regression on 12 examples; the query outputs are squared errors on 3 points."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(12, 3, generator=g, dtype=torch.float64)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
        self.y += 0.3 * torch.randn(12, generator=g, dtype=torch.float64)
        self.qx = torch.randn(3, 3, generator=g, dtype=torch.float64)
        self.calls = []  # (sorted training indices, seed) per retraining

    def train(self, indices, seed):
        self.calls.append((tuple(indices.tolist()), seed))
        x, y = self.x[indices], self.y[indices]
        return torch.linalg.solve(x.T @ x + 0.1 * torch.eye(3, dtype=x.dtype), x.T @ y)

    def eval_loss(self, w):
        return (self.qx @ w) ** 2


def test_evaluate_draws_and_caches_per_seed(tmp_path):
    case = LinearCase()
    scores = torch.randn(3, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    first = quality.evaluate(case, scores, tmp_path, subsets=4, seeds=[0, 1])
    assert len(first) == 2 and first[0] != first[1]
    assert [seed for _, seed in case.calls] == [0] * 4 + [1] * 4
    subsets = {seed: {ids for ids, s in case.calls if s == seed} for seed in (0, 1)}
    assert len(subsets[0]) == 4 and subsets[0] != subsets[1]  # seeded draws differ
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed0", "seed1"]

    case.calls.clear()
    assert quality.evaluate(case, scores, tmp_path, subsets=4, seeds=[0, 1]) == first
    assert case.calls == []  # both seeds come from their caches
    again = quality.evaluate(case, scores, tmp_path, subsets=4, seeds=[1, 2])
    assert again[0] == first[1]
    assert [seed for _, seed in case.calls] == [2] * 4  # only the new seed trains


def test_paired_significance():
    mean, spread, significant = quality.paired([0.50, 0.52, 0.51], [0.40, 0.41, 0.42])
    assert abs(mean - 0.1) < 1e-12 and abs(spread - 0.01) < 1e-12 and significant
    # ahead on average, but one seed behind and a large spread: t = 0.36 < 2.92
    assert quality.paired([0.50, 0.40, 0.62], [0.45, 0.50, 0.50])[2] is False
    assert quality.paired([0.40, 0.41, 0.42], [0.50, 0.52, 0.51])[2] is False  # behind
    assert quality.paired([0.5], [0.4])[2] is None  # one seed: no test


def test_swept_marks_only_damping_rows():
    assert quality.swept("influence ekfac dot full d0.01")
    assert quality.swept("kronfluence ekfac dot full d0.1")
    assert not quality.swept("influence ekfac dot full")  # "dot" is not a damping
    assert not quality.swept("influence kfac dot full-tf")


def test_render_magic_compares_per_ground_truth():
    def row(config, lds, **extra):
        r = {"case": "mlp", "config": config, "bytes": 1, "lds": lds, "lds_std": 0.0}
        for f in quality.SINGLE_FRACTIONS:
            key = quality.single_key(f)
            r.update({key: lds + f, key + "_std": 0.01})
        return {**r, **extra}

    rows = [row(quality.MAGIC_CONFIG, 0.2, steps=200, train_seconds=0.5, record_seconds=0.6,
                seconds=5.0, replays=1.0, states_held=21, record_bytes=1000),
            row("influence ekfac dot full", 0.4), row("influence raw dot full", 0.3),
            row("random", 0.0)]
    text = quality.render_magic(rows)
    assert "| mlp | single-model, 99% kept | 1.190 ± 0.010 | influence ekfac dot full |" in text
    assert "| mlp | 200 | 0.50 | 0.60 | 5.0 | 10x | 1 | 21 | 1000 |" in text
    assert quality.render_magic(rows[1:]) == ""
    assert "single-model LDS, 95% kept" in quality.render(rows)


def test_render_defaults_pairs_each_default_with_its_family_best():
    def row(config, lds):
        return {"case": "mlp", "config": config, "bytes": 1, "lds": lds, "lds_std": 0.01}

    rows = [row("influence auto dot pca8", 0.30), row("influence kfac dot pca8-tf d1", 0.36),
            row("influence raw dot full d1", 0.50), row("influence auto dot full", 0.40),
            row("trak xtx dot p2048", 0.00), row("trak xtx dot p512-fp32 d10", 0.45),
            row("dattri explicit dot full", 0.02), row("dattri explicit dot full d0.1", 0.52),
            row("dattri trak dot p512", 0.05), row("dattri cg dot full d0.1", 0.51),
            row("random", 0.9), {**row("kronfluence ekfac dot full", None), "error": "x"}]
    lines = quality.render_defaults(rows).splitlines()[2:]
    assert lines == [
        "| mlp | ours | full | influence auto dot full | 0.400 ± 0.010 | "
        "influence raw dot full d1 | 0.500 ± 0.010 | +0.100 |",
        "| mlp | ours | pca8 | influence auto dot pca8 | 0.300 ± 0.010 | "
        "influence kfac dot pca8-tf d1 | 0.360 ± 0.010 | +0.060 |",
        "| mlp | trak | - | trak xtx dot p2048 | 0.000 ± 0.010 | "
        "trak xtx dot p512-fp32 d10 | 0.450 ± 0.010 | +0.450 |",
        "| mlp | dattri | explicit | dattri explicit dot full | 0.020 ± 0.010 | "
        "dattri explicit dot full d0.1 | 0.520 ± 0.010 | +0.500 |",
        "| mlp | dattri | trak | dattri trak dot p512 | 0.050 ± 0.010 | "
        "dattri trak dot p512 | 0.050 ± 0.010 | +0.000 |",
    ]  # random is no tool's; a failed default and a family without its default are left out


def test_every_peer_has_flags_and_a_documented_worker():
    assert set(quality.PEER_FLAGS) == set(quality.PEERS)
    for name, peer in quality.PEERS.items():
        flag = quality.PEER_FLAGS[name][0]
        worker = (quality.HERE / peer.worker).read_text()
        assert f"--{flag}-venv" in worker, name
        assert f"--make-{flag}-venv" in quality.__doc__, name
        assert peer.install[0] == ("torch==2.13.0",)  # torch first: no CUDA build is pulled


def test_attn_case_is_learnable_from_its_tokens():
    from benchmarks._quality_cases import CASES, N_QUERY, N_TRAIN

    case = CASES["attn"]()
    assert case.x.shape == (N_TRAIN, 10) and case.qx.shape == (N_QUERY, 10)
    assert case.x.dtype == torch.long and set(case.y.tolist()) == {0, 1, 2, 3}
    model = case.train(torch.arange(N_TRAIN), 0)
    accuracy = (case.logits(model, case.qx).argmax(-1) == case.qy).float().mean()
    assert accuracy > 0.5  # chance is 0.25


def test_held_out_digits_cases_one_short_of_convergence_one_fitted():
    """digits_early stops the digits CNN after 20 steps (still learning: training loss near 1,
    against 0.04 at 150 steps); digits_mlp fits an MLP on the same pixels."""
    from benchmarks._quality_cases import CASES, N_QUERY, N_TRAIN

    losses = {}
    for name in ("digits", "digits_early", "digits_mlp"):
        case = CASES[name]()
        assert len(case.x) == N_TRAIN and len(case.qx) == N_QUERY
        model = case.train(torch.arange(N_TRAIN), 0)
        with torch.no_grad():
            losses[name] = float(case.per_example_loss(model, case.x, case.y).mean())
            accuracy = (case.logits(model, case.qx).argmax(-1) == case.qy).float().mean()
        assert accuracy > 0.7  # chance is 0.1
    assert CASES["digits_mlp"]().x.shape == (N_TRAIN, 64)
    assert losses["digits_early"] > 10 * losses["digits"]
    assert losses["digits_mlp"] < 0.1


def test_second_held_out_cases_learn_what_their_docstrings_say():
    """diabetes3 (tertiles of a noisy target) memorises its training rows and generalises
    poorly; moons stays short of a perfect fit (label noise); bc_adamw and digits_relu learn
    their tables."""
    from benchmarks._quality_cases import CASES, N_QUERY, N_TRAIN

    found = {}
    for name in ("diabetes3", "moons", "bc_adamw", "digits_relu"):
        case = CASES[name]()
        assert len(case.x) == N_TRAIN and len(case.qx) == N_QUERY
        model = case.train(torch.arange(N_TRAIN), 0)
        with torch.no_grad():
            loss = float(case.per_example_loss(model, case.x, case.y).mean())
            accuracy = float((case.logits(model, case.qx).argmax(-1) == case.qy).float().mean())
        found[name] = (loss, accuracy)
    assert set(CASES["diabetes3"]().y.tolist()) == {0, 1, 2}
    assert found["diabetes3"][0] < 0.05 and found["diabetes3"][1] < 0.8  # chance is 1/3
    assert found["moons"][0] > 0.1 and found["moons"][1] > 0.8
    assert found["bc_adamw"][1] > 0.9 and found["digits_relu"][1] > 0.9

def test_include_bias_logs_every_linear_bias(tmp_path):
    """--include-bias: the unprojected rows grow by exactly the model's bias parameters."""
    from benchmarks._quality_cases import CASES

    case = CASES["mlp"]()
    model = case.model()
    biases = sum(m.bias.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    widths = [quality.row_bytes(quality.log_pass(case, model, tmp_path / str(bias), "b", "none",
                                                 None, include_bias=bias)) // 4
              for bias in (False, True)]
    assert widths[1] - widths[0] == biases > 0
