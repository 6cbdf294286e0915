"""The batch sampler draws from exactly each row's nucleus, in proportion, by every path
(nucleus among the top candidates, nucleus wider than them, no top-p at all)."""

from collections import Counter

import torch

from deployments.transformers_engine.sampling import NUCLEUS_CANDIDATES, BatchSampler, RowSampling

VOCAB = 3 * NUCLEUS_CANDIDATES
DRAWS = 1500


def peaked() -> torch.Tensor:
    """Five likely tokens (ids 10..14), then a faint tail over the rest."""
    probabilities = torch.full((VOCAB,), 1e-3 / VOCAB)
    probabilities[10:15] = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.0499])
    return probabilities


def falling() -> torch.Tensor:
    """Mass spread over far more tokens than the candidates: p(i) falls linearly."""
    probabilities = torch.arange(VOCAB, 0, -1, dtype=torch.float32)
    return probabilities / probabilities.sum()


def draw(rows: list[tuple[torch.Tensor, RowSampling]]) -> list[Counter]:
    sampler = BatchSampler([r for _, r in rows], [[0]] * len(rows), VOCAB, "cpu")
    logits = torch.stack([p.log() for p, _ in rows])
    counts = [Counter() for _ in rows]
    for _ in range(DRAWS):
        for row, token in enumerate(sampler.sample(logits).tolist()):
            counts[row][token] += 1
    return counts


def sampled(top_p: float, seed: int) -> RowSampling:
    return RowSampling(temperature=1.0, top_p=top_p, top_k=0, repetition_penalty=1.0, seed=seed)


def test_each_path_draws_only_its_nucleus_in_proportion():
    greedy = RowSampling(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=None)
    tail = falling()
    wide_top_p = 0.75
    # The nucleus of `falling` at 0.75: tokens whose mass before them is at most 0.75.
    wide_size = int(((tail.cumsum(0) - tail) <= wide_top_p).sum())
    assert wide_size > NUCLEUS_CANDIDATES, "the wide row must not fit in the candidates"
    in_candidates, wide, whole, argmax = draw(
        [(peaked(), sampled(0.8, 1)), (tail, sampled(wide_top_p, 2)), (peaked(), sampled(1.0, 3)), (peaked(), greedy)]
    )
    # Mass before: 0 / 0.4 / 0.7 / 0.85 -> tokens 10, 11, 12 form the 0.8 nucleus.
    assert set(in_candidates) == {10, 11, 12}
    for token, probability in ((10, 0.4 / 0.85), (11, 0.3 / 0.85), (12, 0.15 / 0.85)):
        assert abs(in_candidates[token] / DRAWS - probability) < 0.05
    assert max(wide) < wide_size, "a token outside the nucleus was drawn"
    beyond = sum(count for token, count in wide.items() if token >= NUCLEUS_CANDIDATES)
    expected_beyond = float(tail[NUCLEUS_CANDIDATES:wide_size].sum() / tail[:wide_size].sum())
    assert abs(beyond / DRAWS - expected_beyond) < 0.05
    # No top-p: the whole row, the faint tail included (about 0.1% of draws), in proportion.
    assert abs(whole[10] / DRAWS - 0.4) < 0.05 and abs(whole[14] / DRAWS - 0.0499) < 0.025
    assert argmax == Counter({10: DRAWS})


def test_top_k_then_top_p_renormalizes_over_the_top_k():
    # As in transformers (top-k before top-p): after top_k=2 the mass is 0.4/0.7 and
    # 0.3/0.7, so top_p=0.5 keeps only token 10 (token 11 has 0.57 before it).
    row = RowSampling(temperature=1.0, top_p=0.5, top_k=2, repetition_penalty=1.0, seed=5)
    [counts] = draw([(peaked(), row)])
    assert counts == Counter({10: DRAWS})


def test_the_largest_uniform_never_picks_a_zero_weight_token():
    from deployments.transformers_engine.sampling import _invert

    weights = torch.tensor([[0.25, 0.75, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    largest_below_one = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))
    picked = _invert(weights, None, torch.stack([largest_below_one, largest_below_one]))
    assert picked.tolist() == [1, 1]
    assert _invert(weights, None, torch.zeros(2)).tolist() == [0, 1]
