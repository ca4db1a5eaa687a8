import math
import re

import pytest
import torch

from pangu_infer.engine.sampler import Sampler, SamplingRow
from pangu_infer.sampling_params import SamplingParams

# token probabilities 0.5, 0.3, 0.1, 0.05, 0.05
SKEWED = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05]).log()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def row(generator: torch.Generator | None = None, prompt=(), output=(), eos=(), **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), generator, prompt, output, eos)


def draw_many(logits: torch.Tensor, n: int, **params) -> torch.Tensor:
    """n independent draws from one row's distribution, as one batch of n identical rows."""
    result = Sampler(seed=0)(logits.expand(n, -1).contiguous(), [row(**params) for _ in range(n)])
    return torch.tensor(result.token_ids)


def greedy_pick(logits: list[float], **kwargs) -> int:
    return Sampler()(torch.tensor([logits]), [row(temperature=0, **kwargs)]).token_ids[0]


def test_greedy_picks_argmax():
    logits = torch.randn(6, 100, generator=seeded(0))
    result = Sampler()(logits, [row(temperature=0) for _ in range(6)])
    assert result.token_ids == logits.argmax(-1).tolist()
    assert result.logprobs is None and result.top_logprobs == [None] * 6


def test_all_greedy_batch_takes_argmax_without_sorting(monkeypatch):
    def no_sort(*args, **kwargs):
        raise AssertionError("the greedy step must not sort")

    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    monkeypatch.setattr(torch.Tensor, "topk", no_sort)
    monkeypatch.setattr(torch, "sort", no_sort)
    logits = torch.randn(4, 50, generator=seeded(1))
    assert Sampler()(logits, [row(temperature=0) for _ in range(4)]).token_ids == logits.argmax(-1).tolist()


def test_top_k_1_matches_greedy():
    logits = torch.randn(8, 2000, generator=seeded(2))
    rows = [row(seeded(i) if i % 2 else None, temperature=1.5, top_k=1) for i in range(8)]
    assert Sampler(seed=0)(logits, rows).token_ids == logits.argmax(-1).tolist()


def test_greedy_row_consumes_no_randomness_from_its_generator():
    generator = seeded(5)
    before = generator.get_state()
    Sampler()(torch.randn(2, 30), [row(generator, temperature=0, presence_penalty=1.0, output=[1]),
                                   row(temperature=1.0)])
    assert torch.equal(generator.get_state(), before)


def test_sampler_leaves_the_callers_logits_unchanged():
    logits = torch.randn(3, 40, generator=seeded(3))
    copy = logits.clone()
    rows = [row(temperature=0.7, top_p=0.9, repetition_penalty=1.3, prompt=[1, 2], min_tokens=2, eos=[0]),
            row(temperature=0, frequency_penalty=0.5, output=[4, 4]),
            row(temperature=1.0, top_k=5, min_p=0.1)]
    Sampler(seed=0)(logits, rows)
    assert torch.equal(logits, copy)


def run_seeded_request(seed: int, position: int, companions: list[dict], steps: int = 8) -> list[int]:
    """Tokens of one seeded request decoded for `steps` steps at `position` among `companions`."""
    vocab = 2000
    generator = seeded(seed)
    sampler = Sampler(seed=99)
    tokens = []
    for step in range(steps):
        # the request's own logits depend only on its step; the others get fresh noise each step
        ours = torch.randn(vocab, generator=seeded(1000 + step)) * 3
        others = torch.randn(len(companions), vocab)
        logits = torch.cat([others[:position], ours[None], others[position:]])
        rows = [row(seeded(c.pop("seed")) if "seed" in c else None, **c) for c in map(dict, companions)]
        rows.insert(position, row(generator, temperature=1.3, top_p=0.95, output=list(tokens)))
        tokens.append(sampler(logits, rows).token_ids[position])
    return tokens


def test_same_seed_gives_same_tokens_whatever_the_batch_and_position():
    alone = run_seeded_request(seed=7, position=0, companions=[])
    assert alone == run_seeded_request(seed=7, position=0, companions=[])
    # companions that change how many candidates top_p inspects, and one whose nucleus is wide
    # enough to force the full sort
    mixed = [{"temperature": 1.0, "top_k": 1500}, {"temperature": 0.8, "seed": 7}, {"temperature": 0},
             {"temperature": 2.0, "seed": 3, "min_p": 0.1}, {"temperature": 1.0, "top_p": 0.95}]
    for position in (0, 2, 5):
        assert run_seeded_request(seed=7, position=position, companions=mixed) == alone
    assert run_seeded_request(seed=7, position=1, companions=mixed[:2]) == alone


def test_different_seeds_give_different_tokens():
    assert run_seeded_request(seed=7, position=0, companions=[]) != run_seeded_request(
        seed=8, position=0, companions=[])


@pytest.mark.parametrize(
    "params, allowed",
    [
        ({"top_k": 2}, {0, 1}),
        ({"top_k": 3}, {0, 1, 2}),
        ({"top_p": 0.7}, {0, 1}),  # 0.5 < 0.7 <= 0.5 + 0.3
        ({"top_p": 0.85}, {0, 1, 2}),
        ({"top_p": 0.3}, {0}),
        ({"min_p": 0.25}, {0, 1}),  # drops probabilities below 0.125
        ({"min_p": 0.15}, {0, 1, 2}),
        ({"top_k": 3, "top_p": 0.7}, {0, 1}),
        ({"top_k": 3, "min_p": 0.5}, {0, 1}),
    ],
)
def test_filters_never_pick_a_masked_token(params, allowed):
    picked = set(draw_many(SKEWED, 4000, temperature=1.0, **params).tolist())
    assert picked == allowed  # every kept token shows up, nothing else does


def nucleus(logits: torch.Tensor, top_p: float) -> set[int]:
    probs, order = logits.softmax(-1).sort(descending=True)
    size = int(((probs.cumsum(-1) - probs) < top_p).sum())
    return set(order[:size].tolist())


def test_top_p_keeps_exactly_the_nucleus_of_a_large_vocabulary():
    logits = torch.full((3000,), -5.0)
    logits[:20] = torch.linspace(4, 2, 20)
    picked = set(draw_many(logits, 2000, temperature=1.0, top_p=0.9).tolist())
    assert picked == nucleus(logits, 0.9)


def test_top_p_wider_than_the_candidate_shortlist_still_keeps_the_whole_nucleus():
    logits = torch.linspace(0, -3, 3000)  # the 0.9 nucleus spans about 1,900 tokens
    allowed = nucleus(logits, 0.9)
    picked = draw_many(logits, 2000, temperature=1.0, top_p=0.9)
    assert set(picked.tolist()) <= allowed
    assert picked.max() > 1500  # well past the 1,024 candidates looked at first


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sampling_frequencies_match_the_softmax_distribution(temperature):
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5])
    n = 30000
    counts = torch.bincount(draw_many(logits, n, temperature=temperature), minlength=6).double()
    expected = (logits.double() / temperature).softmax(-1) * n
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    assert chi_square < 25  # 5 degrees of freedom: p < 1e-4 for a correct sampler


def test_filtered_sampling_renormalizes_over_the_kept_tokens():
    n = 20000
    counts = torch.bincount(draw_many(SKEWED, n, temperature=1.0, top_k=2), minlength=5).double()
    expected = torch.tensor([0.625, 0.375, 0, 0, 0], dtype=torch.float64) * n
    chi_square = ((counts[:2] - expected[:2]) ** 2 / expected[:2]).sum().item()
    assert chi_square < 16 and counts[2:].sum() == 0


# Each case: the penalized logit of token 0 must equal `expected` exactly; a rival token 1 placed
# just above or just below that value decides the greedy pick.
@pytest.mark.parametrize(
    "raw, expected, kwargs",
    [
        (2.0, 1.0, {"repetition_penalty": 2.0, "prompt": [0]}),  # positive: divided
        (-1.0, -2.0, {"repetition_penalty": 2.0, "output": [0]}),  # negative: multiplied
        (2.0, 1.0, {"repetition_penalty": 2.0, "prompt": [0], "output": [0, 0]}),  # once, not per use
        (2.0, 2.0, {"repetition_penalty": 2.0, "prompt": [3], "output": [3]}),  # unseen: untouched
        (1.0, 0.5, {"presence_penalty": 0.5, "output": [0, 0, 0]}),  # once, whatever the count
        (1.0, 1.0, {"presence_penalty": 0.5, "prompt": [0]}),  # prompt does not count
        (1.0, 0.25, {"frequency_penalty": 0.25, "output": [0, 2, 0, 0]}),  # per occurrence
        (1.0, 1.0, {"frequency_penalty": 0.25, "prompt": [0, 0]}),
        (1.0, -0.75, {"presence_penalty": 1.0, "frequency_penalty": 0.25, "output": [0, 0, 0]}),
        (3.0, 0.5, {"repetition_penalty": 2.0, "presence_penalty": 1.0, "output": [0]}),  # rep first
        (1.0, 1.5, {"presence_penalty": -0.5, "output": [0]}),  # negative penalties reward
    ],
)
def test_penalties_change_logits_exactly_as_specified(raw, expected, kwargs):
    assert greedy_pick([raw, expected - 1e-3, -10.0, -10.0], **kwargs) == 0
    assert greedy_pick([raw, expected + 1e-3, -10.0, -10.0], **kwargs) == 1


def test_penalties_apply_only_to_their_own_row():
    logits = torch.tensor([[2.0, 1.5, 0.0], [2.0, 1.5, 0.0]])
    rows = [row(temperature=0, repetition_penalty=2.0, output=[0]), row(temperature=0)]
    assert Sampler()(logits, rows).token_ids == [1, 0]


def test_min_tokens_suppresses_eos_and_stop_tokens():
    logits = torch.tensor([[9.0, 5.0, 1.0, 0.0]])  # eos=0 most likely, then stop token 1

    def pick(output, **params):
        return Sampler(seed=0)(logits, [row(output=output, eos=[0], **params)]).token_ids[0]

    assert pick([3], temperature=0, min_tokens=2) == 1
    assert pick([3], temperature=0, min_tokens=2, stop_token_ids=[1]) == 2
    assert pick([3, 3], temperature=0, min_tokens=2, stop_token_ids=[1]) == 0
    assert pick([3], temperature=0, min_tokens=2, ignore_eos=True) == 0
    sampled = Sampler(seed=0)(logits.expand(500, -1), [row(eos=[0], temperature=1.0, min_tokens=1)
                                                        for _ in range(500)]).token_ids
    assert 0 not in sampled


def test_logprobs_are_log_softmax_of_the_raw_logits():
    logits = torch.randn(4, 60, generator=seeded(4)) * 3
    rows = [row(temperature=0.5, top_k=3, repetition_penalty=1.5, prompt=[1, 2, 3], logprobs=5),
            row(temperature=0, presence_penalty=2.0, output=[7], logprobs=0),
            row(temperature=0),
            row(seeded(1), temperature=1.0, top_p=0.5, logprobs=1)]
    result = Sampler(seed=0)(logits, rows)
    reference = logits.log_softmax(-1)
    for i, token in enumerate(result.token_ids):
        assert result.logprobs[i] == pytest.approx(reference[i, token].item(), abs=1e-5)
    assert result.top_logprobs[1] is None and result.top_logprobs[2] is None
    for i, k in ((0, 5), (3, 1)):
        top = result.top_logprobs[i]
        assert len(top) == k
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        expected_values, expected_ids = reference[i].topk(k)
        assert [t for t, _ in top] == expected_ids.tolist()
        assert values == pytest.approx(expected_values.tolist(), abs=1e-5)
    assert all(math.isfinite(v) for v in result.logprobs)


def test_logit_bias_sampling_follows_transformers_sequence_bias():
    """Frequencies match softmax(logits + bias / T) where the biased logits come from transformers'
    own SequenceBiasLogitsProcessor (single-token biases are OpenAI's logit_bias)."""
    from transformers import SequenceBiasLogitsProcessor

    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5])
    bias = {0: 1.5, 3: -2.5, 5: 3.0}
    reference = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])(torch.zeros(1, 1, dtype=torch.long), logits[None].clone())[0]
    assert not torch.equal(reference, logits)
    n = 30000
    counts = torch.bincount(draw_many(logits, n, temperature=0.8, logit_bias=bias), minlength=6).double()
    expected = (reference.double() / 0.8).softmax(-1) * n
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    assert chi_square < 25  # 5 degrees of freedom: p < 1e-4 for a correct sampler


def test_logit_bias_bans_and_forces_tokens_per_row():
    logits = torch.tensor([[5.0, 1.0, 0.0, -3.0]] * 3)
    rows = [row(temperature=0, logit_bias={0: -100}), row(temperature=0, logit_bias={"3": 100}), row(temperature=0)]
    assert Sampler()(logits, rows).token_ids == [1, 3, 0]
    # a forced token wins sampled draws too (odds of any other under 1e-40)
    assert set(draw_many(logits[0], 500, temperature=1.0, logit_bias={2: 100}).tolist()) == {2}


def test_allowed_token_ids_only_draws_those_tokens():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0])
    assert set(draw_many(logits, 3000, temperature=1.0, allowed_token_ids=[2, 5]).tolist()) == {2, 5}
    assert greedy_pick(logits.tolist(), allowed_token_ids=[4, 1]) == 1
    # the bias applies among the allowed tokens; logprobs stay those of the raw logits
    result = Sampler()(logits[None], [row(temperature=0, allowed_token_ids=[1, 4], logit_bias={4: 5.0}, logprobs=1)])
    assert result.token_ids == [4]
    assert result.top_logprobs[0][0][0] == 0
    assert math.isclose(result.logprobs[0], logits.log_softmax(-1)[4].item(), rel_tol=1e-6)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"logit_bias": {0: 101}}, "logit_bias[0]=101"),
        ({"logit_bias": {0: float("nan")}}, "logit_bias[0]=nan"),
        ({"logit_bias": {"x1": 1}}, "the key 'x1'"),
        ({"logit_bias": {-2: 1}}, "the key -2"),
        ({"logit_bias": {i: 1 for i in range(301)}}, "at most 300"),
        ({"logit_bias": [1, 2]}, "logit_bias="),
        ({"allowed_token_ids": []}, "allowed_token_ids=[]"),
        ({"allowed_token_ids": [1, -1]}, "allowed_token_ids=[1, -1]"),
    ],
)
def test_bad_logit_bias_and_allowed_token_ids_name_the_field(params, message):
    from pangu_infer.errors import RequestError

    with pytest.raises(RequestError, match=re.escape(message)) as info:
        SamplingParams(**params)
    assert info.value.param == next(iter(params))


def test_a_prompt_tokens_rank_counts_ties_as_vllm_does():
    """vLLM's rank: the tokens whose logprob is at least the target's, itself included (its sampler's
    batched_count_greater_than is `x >= value`): 1 for the likeliest, tied tokens share the last place."""
    from pangu_infer.engine.sampler import token_logprobs

    logits = torch.tensor([[2.0, 2.0, 0.0, 3.0], [2.0, 2.0, 0.0, 3.0], [5.0, 1.0, 1.0, 1.0]])
    ranks = [r for _, _, r in token_logprobs(logits, [0, 3, 0], 1)]
    assert ranks == [3, 1, 1]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_row_whose_restrictions_exclude_every_token_is_reported_and_the_others_sampled(temperature):
    """allowed_token_ids holding only the eos token while min_tokens masks it: no token is left. The
    row is reported blocked (its token meaningless) instead of drawn from a row of -inf; the rows
    beside it get the tokens they get alone."""
    logits = torch.randn(3, 50, generator=seeded(1))
    rows = lambda: [  # noqa: E731
        row(seeded(2), temperature=temperature, seed=2),
        row(seeded(3), eos=(7,), temperature=temperature, seed=3, allowed_token_ids=[7], min_tokens=2),
        row(seeded(4), temperature=temperature, seed=4, allowed_token_ids=[3, 9]),
    ]
    result = Sampler()(logits, rows())
    assert result.blocked == [1]
    alone = [Sampler()(logits[i : i + 1], [r]).token_ids[0] for i, r in enumerate(rows()) if i != 1]
    assert [result.token_ids[0], result.token_ids[2]] == alone
    assert result.token_ids[2] in (3, 9)
    # once min_tokens is met, eos is allowed again
    assert Sampler()(logits[1:2], [row(seeded(3), output=(1, 2), eos=(7,), temperature=temperature, seed=3,
                                       allowed_token_ids=[7], min_tokens=2)]).token_ids == [7]


def test_top_p_nucleus_past_the_second_shortlist_is_kept_whole():
    # the 0.9 nucleus of 60,000 logits falling evenly spans about 38,000 tokens: past the 1,024
    # candidates looked at first and the 16,384 looked at next
    logits = torch.linspace(0, -1, 60000)
    allowed = nucleus(logits, 0.9)
    assert len(allowed) > 16384
    picked = draw_many(logits, 300, temperature=1.0, top_p=0.9)
    assert set(picked.tolist()) <= allowed
    assert picked.max() > 16384


def awkward_rows() -> torch.Tensor:
    """Rows with ties, infinities and NaN, as logits can hold after masks and penalties."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-20, 20, (6, 5000), generator=g).float() / 4  # many ties
    x[1, 100:4000] = float("-inf")
    x[2, 7] = float("inf")
    x[3, 11] = float("nan")
    x[4] = float("-inf")
    x[5, ::2] = -0.0
    x[5, 1::2] = 0.0
    return x


@pytest.mark.parametrize("n", [1, 20, 1024, 4999, 5000])
def test_the_largest_values_are_torchs_sorted_values(n):
    from pangu_infer.engine.sampler import largest_sorted

    x = awkward_rows()
    expected = x.sort(dim=-1, descending=True).values[:, :n]
    torch.testing.assert_close(largest_sorted(x, n), expected, rtol=0, atol=0, equal_nan=True)


def test_the_row_argmax_is_torchs_argmax():
    from pangu_infer.engine.sampler import row_argmax

    x = awkward_rows()
    assert torch.equal(row_argmax(x), x.argmax(dim=-1))
    assert torch.equal(row_argmax(x[:, ::3]), x[:, ::3].argmax(dim=-1))  # not contiguous


@pytest.mark.parametrize("filtered", [{"top_p": 0.5}, {"top_k": 5}])
def test_a_row_without_filters_keeps_its_whole_vocabulary_beside_a_filtered_row(filtered):
    # the filtered rows' shortlist (1,024 candidates) must not cut the unfiltered rows: a third of
    # their probability lies past their 1,024 largest logits
    logits = torch.linspace(0, -3, 3000)
    n = 4000
    rows = [row(temperature=1.0, **(filtered if i % 2 == 0 else {})) for i in range(n)]
    picked = torch.tensor(Sampler(seed=0)(logits.expand(n, -1).contiguous(), rows).token_ids[1::2])
    share = logits.double().softmax(-1)[1024:].sum().item()  # 0.325
    past = (picked >= 1024).double().mean().item()
    assert abs(past - share) < 4 * math.sqrt(share * (1 - share) / len(picked))


@pytest.mark.parametrize("with_seeds", [False, True])
def test_a_row_of_nan_logits_under_top_p_leaves_the_other_rows_draws_alone(with_seeds):
    # (it raised for the whole batch: the NaN row's cut-off index was -1)
    logits = SKEWED.expand(400, -1).clone()
    logits[::2, 1] = float("nan")  # a broken row every other one
    rows = [row(seeded(i) if with_seeds else None, temperature=1.0, top_p=0.7) for i in range(400)]
    picked = Sampler(seed=0)(logits, rows).token_ids
    assert set(picked[1::2]) == {0, 1}  # the healthy rows: their 0.7 nucleus, both tokens
    assert all(0 <= t < 5 for t in picked[::2])  # the broken ones: some token id, no error


@pytest.mark.parametrize("params", [{"top_p": 0.7}, {"top_k": 2}, {}])
def test_a_row_with_an_infinite_logit_leaves_the_other_rows_draws_alone(params):
    # an infinite logit (a model's overflow) once turned its row's weights to NaN, and the NaN ran
    # on through the cumulative sums of every row after it
    logits = SKEWED.expand(400, -1).clone()
    logits[::2, 3] = float("inf")
    picked = Sampler(seed=0)(logits, [row(temperature=1.0, **params) for _ in range(400)]).token_ids
    assert set(picked[1::2]) == ({0, 1} if params else {0, 1, 2, 3, 4})
    assert all(0 <= t < 5 for t in picked[::2])


@pytest.mark.parametrize("params", [{"top_p": 0.7}, {"top_k": 2}])
def test_a_lone_row_of_nan_logits_under_a_filter_still_gets_a_token(params):
    logits = torch.full((1, 5), float("nan"))
    assert 0 <= Sampler(seed=0)(logits, [row(temperature=1.0, **params)]).token_ids[0] < 5


@pytest.mark.parametrize("vocab", [5, 1023, 3000, 153376])
def test_the_inverse_cdf_draw_is_numpys_cumulative_search(vocab):
    # zero-probability tokens, a zero tail and a draw at 1 - 2**-53 included: never a token of
    # probability 0
    import numpy as np

    from pangu_infer.engine.sampler import inverse_cdf

    g = seeded(vocab)
    probs = torch.rand(4, vocab, generator=g) ** 8
    probs[1, ::3] = 0.0
    probs[2, : vocab // 2] = 0.0
    probs[3, vocab // 3 :] = 0.0
    probs[3, 0] = 1e-30
    u = torch.cat([torch.tensor([0.0, 1 - 2**-53]), torch.rand(300, generator=g, dtype=torch.float64)])
    for r in range(4):
        p = probs[r].double().numpy()
        cdf = np.cumsum(p)
        expected = np.searchsorted(cdf, u.numpy() * cdf[-1], side="right").clip(max=vocab - 1)
        expected = np.where(p[expected] > 0, expected, np.flatnonzero(p > 0)[-1])
        got = inverse_cdf(probs[r].expand(len(u), -1).contiguous(), u[:, None])
        assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("temperature", [1e308, 3.5e38])
def test_a_temperature_past_float32_draws_uniformly_from_the_unmasked_tokens(temperature):
    # it was infinite as a float32, and a masked (-inf) logit over it NaN: masked tokens were drawn
    from pangu_infer.engine.spec_decode import rows_probs

    logits = SKEWED.expand(200, -1).clone()
    logits[:, 2:] = float("-inf")  # a grammar's or allowed_token_ids' mask
    picked = Sampler(seed=0)(logits, [row(temperature=temperature) for _ in range(200)]).token_ids
    assert set(picked) == {0, 1}
    probs = rows_probs(logits[:2], [SamplingParams(temperature=temperature)] * 2)
    assert torch.equal(probs, torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0]] * 2))


def test_a_row_holding_plus_infinity_draws_among_those_tokens_alone():
    # softmax makes such a row NaN throughout, and the draw was token 0 or the last one, masked or not
    from pangu_infer.engine.spec_decode import rows_probs

    logits = SKEWED.expand(200, -1).clone()
    logits[:, 1] = logits[:, 3] = float("inf")  # a positive logit over a repetition penalty near 0
    logits[:, 0] = logits[:, 4] = float("-inf")  # masked
    rows = [row(seeded(i) if i % 2 else None, temperature=1.0) for i in range(200)]
    assert set(Sampler(seed=0)(logits, rows).token_ids) == {1, 3}
    assert torch.equal(rows_probs(logits[:1], [SamplingParams()]), torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]))


@pytest.mark.parametrize("penalty", [1e-300, 1e300])
def test_a_repetition_penalty_past_float32_leaves_no_nan(penalty):
    # 1e-300 was 0 as a float32 (a seen masked token's -inf times it NaN, the argmax's pick), 1e300
    # inf (a seen logit of 0 times it NaN)
    logits = torch.tensor([[0.0, -1.0, float("-inf"), 2.0, -3.0]])
    picked = Sampler(seed=0)(logits.clone(), [row(temperature=0, repetition_penalty=penalty, prompt=[0, 1, 2])]).token_ids
    assert picked == [3]
