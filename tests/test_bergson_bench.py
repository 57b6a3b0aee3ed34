"""benchmarks/bergson_side_by_side.py's pieces that decide its figures: right padding leaves
each sequence's gradient as it is unpadded, the exact scores are per-example gradient dot
products, the split keeps probes unique and held-out queries out of training, and the metrics
count what they say."""

import torch

from benchmarks import bergson_side_by_side as bench
from benchmarks._common import make_gpt2
from benchmarks._lm_corpus import PAD, VOCAB, batches, lm_loss


def _model():
    return make_gpt2(n_layer=1, n_embd=16, n_head=2, n_positions=16, vocab_size=VOCAB)


def test_a_padded_sequence_has_its_unpadded_gradient():
    model = _model()
    short, long = [5, 9, 200, 3], [7, 1, 2, 8, 8, 4, 30, 11]
    _, ids = next(batches([short, long], 2))
    assert ids[0, 4:].eq(PAD).all()
    lm_loss(model, ids[:1]).backward()
    padded = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    lm_loss(model, torch.tensor([short])).backward()
    for a, p in zip(padded, model.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_exact_scores_are_dot_products_of_per_example_gradients():
    model = _model()
    train, queries = [[1, 2, 3, 4], [9, 8, 7], [5, 5, 5, 5, 5]], [[3, 1, 4, 1, 5]]
    scores, layers = bench.exact_scores(model, train, queries, chunk=2)
    assert layers == 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj of the one block

    def flat(seq):
        model.zero_grad()
        lm_loss(model, torch.tensor([seq])).backward()
        return torch.cat([p.grad.reshape(-1) for n, p in model.named_parameters()
                          if n.startswith(bench.LAYERS) and p.ndim == 2])

    expected = torch.stack([flat(queries[0]) @ flat(t) for t in train])[None]
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)


def test_split_keeps_queries_out_and_probes_unique():
    sequences = [[i % 7] for i in range(40)]  # 7 distinct sequences, most repeated
    sequences += [[100 + i] for i in range(10)]  # 10 that occur once
    train, held_out, probes = bench.split(sequences, n_queries=5, n_probes=3, n_train=10**9)
    assert len(train) == 45 and len(held_out) == 5
    assert all(train.count(train[i]) == 1 for i in probes)


def test_metrics_count_hits_and_overlap():
    scores = torch.tensor([[0.0, 3.0, 2.0, 1.0], [5.0, 0.0, 1.0, 2.0]])
    assert bench.probe_hits(scores, [1, 3], k=2) == (1, 2)
    exact = torch.tensor([[0.0, 3.0, 2.5, 1.0], [0.0, 1.0, 2.0, 3.0]])  # overlaps 2/2, 1/2
    assert bench.top_overlap(scores, exact, k=2) == 0.75
