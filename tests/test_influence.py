"""Influence equals g_q^T (H + lambda I)^-1 g_i built from explicit matrices, for every
preconditioner and mode, on tiny models; plus top-k, score files, groups and determinism."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

import logix
from conftest import log_classifier_steps
from logix.influence.damping import AUTO_FACTOR
from logix.storage.reader import LogReader
from logix.storage.scores import load_scores

HESSIANS = ["none", "raw", "kfac", "ekfac"]
MODES = ["dot", "cosine", "l2"]


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


def make_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))


def mlp_data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def cnn_data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def log_run(tmp_path, model, x, y, project="p", batch=8, rank=3, shard_rows=None,
            setup=("grad_cov", "kfac"), **overrides):
    run = logix.init(project, root_dir=str(tmp_path), rank=rank, shard_rows=shard_rows,
                     **overrides)
    run.watch(model)
    if rank:
        run.add_lora()
    spec = {"grad": ["log"]}
    if "grad_cov" in setup:
        spec["grad"].append("covariance")
    if "kfac" in setup:
        spec.update(forward=["covariance"], backward=["covariance"])
    run.setup(spec)
    log_classifier_steps(run, model, x, y, batch)
    return run


def query_log(run, model, x, y, ids=("q0", "q1", "q2")):
    run.eval()
    with run(data_id=list(ids)):
        F.cross_entropy(model(x[:len(ids)]), y[:len(ids)], reduction="sum").backward()
    return run.get_log(copy=True)


def explicit_inverse(run, train_rows, hessian, damping=None):
    """Block-diagonal (H_m + lambda_m I)^-1 from explicit matrices, float64."""
    blocks = []
    for m in run.layout():
        eye = torch.eye(m.dim, dtype=torch.float64)
        if hessian == "none":
            blocks.append(eye)
            continue
        g = train_rows[:, m.columns].double()
        if hessian == "raw":
            h = g.T @ g / g.shape[0]
        else:
            a = run.statistics.get(m.name, "forward").double()
            s = run.statistics.get(m.name, "backward").double()
            h = torch.kron(s, a)
            if hessian == "ekfac":
                _, qa = torch.linalg.eigh(a)
                _, qs = torch.linalg.eigh(s)
                rotated = qs.T @ g.reshape(-1, m.rank_out, m.rank_in) @ qa
                basis = torch.kron(qs, qa)
                h = basis @ torch.diag(rotated.square().mean(0).flatten()) @ basis.T
        if damping is None:  # the default, damping="auto": AUTO_FACTOR x the RMS eigenvalue
            lam = AUTO_FACTOR * torch.linalg.matrix_norm(h) / m.dim ** 0.5
        else:
            lam = damping
        blocks.append(torch.linalg.inv(h + lam * eye))
    return torch.block_diag(*blocks)


def brute_force(q, g, h_inv, mode):
    q, g = q.double(), g.double()
    s = q @ h_inv @ g.T
    qq = ((q @ h_inv) * q).sum(1)[:, None]
    gg = ((g @ h_inv) * g).sum(1)[None]
    if mode == "cosine":
        return s / (qq.sqrt() * gg.sqrt())
    if mode == "l2":
        return -(qq - 2 * s + gg)
    return s


def assert_scores(actual, expected):
    assert actual.shape == expected.shape and actual.numel() > 0
    scale = expected.abs().max()
    torch.testing.assert_close(actual.double() / scale, expected / scale, rtol=0, atol=2e-5)


@pytest.mark.parametrize("hessian", HESSIANS)
@pytest.mark.parametrize("mode", MODES)
def test_mlp_matches_explicit_matrices(tmp_path, hessian, mode):
    model = make_mlp()
    x, y = mlp_data(40)
    run = log_run(tmp_path, model, x, y, shard_rows=11)
    test = query_log(run, model, x, y)
    _, train = run.reader().read_all()
    result = run.compute_influence_all(test, hessian=hessian, mode=mode)
    assert result["tgt_ids"] == list(range(40))
    assert result["src_ids"] == ["q0", "q1", "q2"]
    expected = brute_force(test.grads, train, explicit_inverse(run, train, hessian), mode)
    assert_scores(result["influence"], expected)


@pytest.mark.parametrize("hessian", HESSIANS)
def test_cnn_matches_explicit_matrices_per_module_and_summed(tmp_path, hessian):
    model = make_cnn()
    x, y = cnn_data(24)
    run = log_run(tmp_path, model, x, y, rank=2)
    test = query_log(run, model, x, y)
    _, train = run.reader().read_all()
    h_inv = explicit_inverse(run, train, hessian)
    result = run.compute_influence_all(test, hessian=hessian, influence_groups="module")
    assert_scores(result["influence"], brute_force(test.grads, train, h_inv, "dot"))
    for m in run.layout():
        cols = m.columns
        expected = test.grads[:, cols].double() @ h_inv[cols, cols] @ train[:, cols].double().T
        assert_scores(result["groups"][m.name], expected)
    total = sum(result["groups"].values())
    torch.testing.assert_close(total, result["influence"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hessian", ["raw", "ekfac"])
def test_tiny_gpt2_matches_explicit_matrices(tmp_path, hessian):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=8,
                                     attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config).eval()
    tokens = torch.randint(0, 40, (12, 6), generator=torch.Generator().manual_seed(3))

    def seq_loss(ids):
        logits = model(input_ids=ids).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, 40), ids[:, 1:].reshape(-1), reduction="sum")

    run = logix.init("gpt", root_dir=str(tmp_path), rank=2)
    run.watch(model, name_filter=["attn", "mlp"])
    run.add_lora()
    run.setup({"grad": ["log", "covariance"], "forward": ["covariance"],
               "backward": ["covariance"]})
    run.save(True)
    for start in range(0, 12, 4):
        with run(data_id=list(range(start, start + 4))):
            seq_loss(tokens[start:start + 4]).backward()
    run.finalize()
    run.eval()
    with run(data_id=["a", "b"]):
        seq_loss(tokens[:2]).backward()
    test = run.get_log()
    _, train = run.reader().read_all()
    result = run.compute_influence_all(test, hessian=hessian)
    expected = brute_force(test.grads, train, explicit_inverse(run, train, hessian), "dot")
    assert_scores(result["influence"], expected)


def test_full_rank_raw_equals_classical_influence_function(tmp_path):
    """No projection, one layer with bias (logistic regression): block-diagonal = full, so raw
    influence is g_q^T (F + lambda I)^-1 g_i with F the empirical Fisher from torch.func."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    x, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    run = log_run(tmp_path, model, x, y, rank=None, setup=("grad_cov",), include_bias=True)
    test = query_log(run, model, x, y, ids=("q0", "q1"))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None], reduction="sum")

    def flat_grads(xs, ys):
        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, xs, ys)
        return torch.cat([g["weight"], g["bias"][:, :, None]], 2).reshape(len(xs), -1).double()

    train, queries = flat_grads(x, y), flat_grads(x[:2], y[:2])
    fisher = train.T @ train / len(x)
    damping = 0.05
    expected = queries @ torch.linalg.inv(fisher + damping * torch.eye(len(fisher),
                                                                       dtype=torch.float64)) @ train.T
    result = run.compute_influence_all(test, hessian="raw", damping=damping)
    assert_scores(result["influence"], expected)


def test_self_influence_is_the_diagonal(tmp_path):
    model = make_mlp()
    x, y = mlp_data(20)
    run = log_run(tmp_path, model, x, y)
    ids, train = run.reader().read_all()
    from logix.log import StepRows

    train_log = StepRows(ids, train, run.layout())
    for hessian in HESSIANS:
        pairwise = run.compute_influence(train_log, train_log, hessian=hessian)["influence"]
        streamed = run.compute_self_influence(hessian=hessian)
        in_memory = run.compute_self_influence(train_log, hessian=hessian)
        assert streamed["ids"] == ids
        torch.testing.assert_close(streamed["influence"], pairwise.diagonal(), rtol=1e-4,
                                   atol=1e-6)
        torch.testing.assert_close(in_memory["influence"], pairwise.diagonal(), rtol=1e-4,
                                   atol=1e-6)


def test_named_groups_sum_to_total(tmp_path):
    model = make_mlp()
    x, y = mlp_data(20)
    run = log_run(tmp_path, model, x, y)
    test = query_log(run, model, x, y)
    result = run.compute_influence_all(test, hessian="ekfac",
                                       influence_groups={"first": ["0"], "last": ["2"]})
    assert set(result["groups"]) == {"first", "last"}
    torch.testing.assert_close(result["groups"]["first"] + result["groups"]["last"],
                               result["influence"], rtol=1e-5, atol=1e-6)
    with pytest.raises(logix.UsageError, match="matches no logged module"):
        run.compute_influence_all(test, influence_groups={"x": ["nope"]})


def test_topk_equals_sorting_and_out_equals_memory(tmp_path):
    model = make_mlp()
    x, y = mlp_data(50)
    run = log_run(tmp_path, model, x, y, shard_rows=9)
    test = query_log(run, model, x, y)
    full = run.compute_influence_all(test, hessian="kfac", block_rows=16)
    top = run.compute_influence_all(test, hessian="kfac", topk=5, block_rows=16)
    values, index = full["influence"].sort(1, descending=True)
    torch.testing.assert_close(top["top_scores"], values[:, :5])
    assert top["top_ids"] == [[full["tgt_ids"][i] for i in row] for row in index[:, :5].tolist()]
    torch.testing.assert_close(top["bottom_scores"], values[:, -5:].flip(1))
    out = tmp_path / "scores.safetensors"
    written = run.compute_influence_all(test, hessian="kfac", block_rows=16, out=str(out))
    assert written["path"] == str(out)
    loaded = load_scores(str(out))
    assert torch.equal(loaded["influence"], full["influence"])
    assert loaded["tgt_ids"] == full["tgt_ids"] and loaded["src_ids"] == full["src_ids"]


def test_streamed_topk_and_score_files_reuse_one_block_buffer(tmp_path, monkeypatch):
    import logix.influence.attributor as attributor
    import logix.influence.scoring as scoring

    for module in (attributor, scoring):  # 8-row chunks: 50 rows stream in 4 blocks of 16
        monkeypatch.setattr(module, "SCORE_CHUNK", 8)
    buffers = []
    monkeypatch.setattr(attributor, "score_buffer",
                        lambda *a: buffers.append(a) or scoring.score_buffer(*a))
    model = make_mlp()
    x, y = mlp_data(50)
    run = log_run(tmp_path, model, x, y, shard_rows=9)
    test = query_log(run, model, x, y)
    full = run.compute_influence_all(test, hessian="none", block_rows=16)
    assert [n for n, _, _ in buffers] == [50]  # the full matrix, allocated once
    top = run.compute_influence_all(test, hessian="none", topk=5, block_rows=16)
    values, index = full["influence"].sort(1, descending=True)
    assert torch.equal(top["top_scores"], values[:, :5])
    assert top["top_ids"] == [[full["tgt_ids"][i] for i in row] for row in index[:, :5].tolist()]
    assert torch.equal(top["bottom_scores"], values[:, -5:].flip(1))
    written = run.compute_influence_all(test, hessian="none", block_rows=16,
                                        out=str(tmp_path / "s.safetensors"))
    assert torch.equal(load_scores(written["path"])["influence"], full["influence"])
    assert [n for n, _, _ in buffers] == [50, 16, 16]  # one block buffer per streamed query


def test_streamed_blocks_are_capped_in_bytes_for_wide_rows(tmp_path, monkeypatch):
    import logix.influence.attributor as attributor
    import logix.influence.scoring as scoring

    for module in (attributor, scoring):
        monkeypatch.setattr(module, "SCORE_CHUNK", 8)
    model = make_mlp()
    x, y = mlp_data(50)
    run = log_run(tmp_path, model, x, y, shard_rows=9)
    test = query_log(run, model, x, y)
    full = run.compute_influence_all(test, hessian="none", block_rows=48)
    monkeypatch.setattr(scoring, "BLOCK_BYTES", 4 * run.reader().dim * 20)  # 20 rows' bytes
    sizes = []
    real = LogReader.fixed_blocks
    monkeypatch.setattr(LogReader, "fixed_blocks",
                        lambda self, block_rows, *a, **kw: sizes.append(block_rows)
                        or real(self, block_rows, *a, **kw))
    capped = run.compute_influence_all(test, hessian="none", block_rows=48)
    assert sizes == [24]  # 20 rows rounded up to whole 8-row chunks, not the 48 asked for
    assert torch.equal(capped["influence"], full["influence"])


def test_scores_do_not_depend_on_shard_or_block_size(tmp_path):
    model = make_mlp()
    x, y = mlp_data(70)
    results = []
    for i, (shard_rows, block_rows) in enumerate([(7, 5), (1000, 8), (13, 70), (3, 4096)]):
        run = log_run(tmp_path, model, x, y, project=f"p{i}", shard_rows=shard_rows, setup=())
        test = query_log(run, model, x, y)
        for mode in MODES:
            results.append(run.compute_influence_all(test, hessian="none", mode=mode,
                                                     block_rows=block_rows)["influence"])
    for i, other in enumerate(results[3:]):
        assert torch.equal(other, results[i % 3])


def test_damping_is_never_applied_in_place(tmp_path):
    model = make_mlp()
    x, y = mlp_data(30)
    run = log_run(tmp_path, model, x, y)
    test = query_log(run, model, x, y)
    for hessian in ("raw", "kfac", "ekfac"):
        first = run.compute_influence_all(test, hessian=hessian, damping=1.0)["influence"]
        other = run.compute_influence_all(test, hessian=hessian, damping=1e-3)["influence"]
        again = run.compute_influence_all(test, hessian=hessian, damping=1.0)["influence"]
        assert torch.equal(first, again)
        assert not torch.allclose(first, other)


def test_cosine_norm_cache_is_reused_and_keyed(tmp_path):
    model = make_mlp()
    x, y = mlp_data(30)
    run = log_run(tmp_path, model, x, y)
    test = query_log(run, model, x, y)
    first = run.compute_influence_all(test, hessian="kfac", mode="cosine")["influence"]
    cache = list((tmp_path / "p" / "cache").iterdir())
    assert len(cache) == 1
    again = run.compute_influence_all(test, hessian="kfac", mode="cosine")["influence"]
    assert torch.equal(first, again) and len(list((tmp_path / "p" / "cache").iterdir())) == 1
    run.compute_influence_all(test, hessian="kfac", mode="cosine", damping=0.5)
    assert len(list((tmp_path / "p" / "cache").iterdir())) == 2


def test_query_in_a_new_process_matches(tmp_path):
    model = make_mlp()
    x, y = mlp_data(30)
    run = log_run(tmp_path, model, x, y)
    test = query_log(run, model, x, y)
    expected = run.compute_influence_all(test, hessian="ekfac")["influence"]
    torch.save({"model": model.state_dict(), "expected": expected}, tmp_path / "ref.pt")
    script = textwrap.dedent(f"""
        import torch, logix
        from torch import nn
        from torch.nn import functional as F
        ref = torch.load({str(tmp_path / 'ref.pt')!r})
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
        model.load_state_dict(ref["model"])
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(30, 6, generator=g), torch.randint(0, 4, (30,), generator=g)
        run = logix.init("p", root_dir={str(tmp_path)!r})
        run.watch(model)
        run.initialize_from_log()
        run.eval()
        with run(data_id=["q0", "q1", "q2"]):
            F.cross_entropy(model(x[:3]), y[:3], reduction="sum").backward()
        got = run.compute_influence_all(run.get_log(), hessian="ekfac")["influence"]
        torch.testing.assert_close(got, ref["expected"], rtol=1e-5, atol=1e-6)
        print("OK")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr


def test_mismatched_query_is_refused(tmp_path):
    model = make_mlp()
    x, y = mlp_data(16)
    run = log_run(tmp_path, model, x, y)
    other = logix.init("other", root_dir=str(tmp_path), rank=2)
    other.watch(model)
    other.add_lora()
    other.eval()
    with other(data_id=["q"]):
        F.cross_entropy(model(x[:1]), y[:1], reduction="sum").backward()
    with pytest.raises(logix.UsageError, match="differ from the saved log"):
        run.compute_influence_all(other.get_log())


def test_missing_statistics_name_the_fix(tmp_path):
    model = make_mlp()
    x, y = mlp_data(16)
    run = log_run(tmp_path, model, x, y, setup=())
    test = query_log(run, model, x, y)
    with pytest.raises(logix.UsageError, match="covariance"):
        run.compute_influence_all(test, hessian="raw")
    with pytest.raises(logix.UsageError, match="allowed values"):
        run.compute_influence_all(test, hessian="hessian-free")
    assert run.influence.available_hessians() == ["none", "lissa", "full"]  # rows alone
