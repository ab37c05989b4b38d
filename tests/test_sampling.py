"""tracer.sampling: each stage against transformers' processors, the order, and the draw."""

from __future__ import annotations

import pytest
import torch

from tracer import sampling
from tracer.errors import GenerationError

logits_process = pytest.importorskip("transformers.generation.logits_process")

PARAMS = [
    dict(temperature=0.7, top_k=40, top_p=0.95, repetition_penalty=1.1),  # the walkthrough's
    dict(temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0),  # transformers' defaults
    dict(temperature=1.3, top_k=0, top_p=0.5, repetition_penalty=1.5),
    dict(temperature=0.2, top_k=5, top_p=0.9, repetition_penalty=0.8),
    dict(temperature=0.9, top_k=1000, top_p=0.3, repetition_penalty=2.0),
]


def hf_distribution(logits, previous, temperature, top_k, top_p, repetition_penalty):
    """transformers' sampling order, built from its own processor classes."""
    chain = logits_process.LogitsProcessorList()
    if repetition_penalty != 1.0:
        chain.append(logits_process.RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if temperature != 1.0:
        chain.append(logits_process.TemperatureLogitsWarper(temperature))
    if top_k != 0:
        chain.append(logits_process.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        chain.append(logits_process.TopPLogitsWarper(top_p))
    scores = chain(previous[None], logits[None].clone())
    return torch.softmax(scores, dim=-1)[0]


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distribution_matches_transformers(params, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(500, generator=g) * 3
    previous = torch.randint(0, 500, (30,), generator=g)
    got = sampling.distribution(logits, previous, **params)
    expected = hf_distribution(logits, previous, **params)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert torch.isclose(got.sum(), torch.tensor(1.0))


def test_distribution_keeps_the_knobs_not_given_at_transformers_defaults():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(500, generator=g) * 3
    previous = torch.randint(0, 500, (30,), generator=g)
    defaults = PARAMS[1]
    torch.testing.assert_close(sampling.distribution(logits, previous),
                               hf_distribution(logits, previous, **defaults), atol=1e-6, rtol=0)
    torch.testing.assert_close(sampling.distribution(logits, previous, top_p=0.5),
                               hf_distribution(logits, previous, **{**defaults, "top_p": 0.5}), atol=1e-6, rtol=0)


def test_each_stage_matches_its_transformers_processor():
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(1, 300, generator=g) * 2
    prev = torch.randint(0, 300, (1, 40), generator=g)
    pairs = [
        (sampling.apply_repetition_penalty(scores, prev, 1.3),
         logits_process.RepetitionPenaltyLogitsProcessor(1.3)(prev, scores.clone())),
        (sampling.apply_temperature(scores, 0.6), logits_process.TemperatureLogitsWarper(0.6)(prev, scores.clone())),
        (sampling.apply_top_k(scores, 17), logits_process.TopKLogitsWarper(17)(prev, scores.clone())),
        (sampling.apply_top_p(scores, 0.8), logits_process.TopPLogitsWarper(0.8)(prev, scores.clone())),
    ]
    for ours, theirs in pairs:
        assert torch.equal(ours, theirs)


def test_repetition_penalty_pushes_both_signs_down_once_per_id():
    scores = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = sampling.apply_repetition_penalty(scores, torch.tensor([0, 1, 1, 0]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]


def test_top_k_keeps_ties_and_top_p_keeps_the_best():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.0])
    assert torch.isinf(sampling.apply_top_k(scores, 1)).tolist() == [True, False, False, True]
    peaked = torch.tensor([10.0, 0.0, 0.0])
    assert torch.isfinite(sampling.apply_top_p(peaked, 0.01)).tolist() == [True, False, False]


def test_greedy_skips_warpers_and_takes_argmax():
    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0]])
    prev = torch.tensor([[1]])
    settings = sampling.SamplingSettings(do_sample=False, temperature=0.1, top_k=1, repetition_penalty=2.0)
    stages = sampling.stage_scores(logits, prev, settings)
    assert torch.equal(stages["top_p"], stages["repetition_penalty"])
    assert sampling.choose(stages["final"], do_sample=False).item() == 2  # 5.0 / 2 < 4.9


def test_seeded_draws_are_reproducible_and_follow_the_generator():
    probs = torch.softmax(torch.randn(1, 100, generator=torch.Generator().manual_seed(0)), -1)
    draw = lambda seed: [  # noqa: E731
        sampling.choose(probs, do_sample=True, generator=g).item()
        for g in [torch.Generator().manual_seed(seed)]
        for _ in range(20)
    ]
    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


@pytest.mark.parametrize(
    "bad",
    [
        dict(do_sample=True, temperature=0.0),
        dict(do_sample=True, temperature=-1.0),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(repetition_penalty=0.0),
        dict(temperature=float("nan")),
    ],
)
def test_invalid_settings_are_refused_with_a_message(bad):
    with pytest.raises(GenerationError) as err:
        sampling.SamplingSettings(**bad)
    assert any(k in str(err.value) for k in bad)


def test_stage_names_are_in_transformers_order():
    assert sampling.STAGES == ("raw", "repetition_penalty", "temperature", "top_k", "top_p", "final")


def test_kept_counts_surviving_tokens_and_mass_kept_their_share_of_the_previous_stage():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, -1.0]])
    cut = sampling.apply_top_k(scores, 2)  # the tie at the 2nd best survives: 2 asked, 2 kept
    assert sampling.kept(scores).tolist() == [5] and sampling.kept(cut).tolist() == [2]
    before = torch.softmax(scores, -1)
    assert sampling.mass_kept(before, cut).item() == pytest.approx(before[0, 1:3].sum().item())
    assert sampling.mass_kept(before, scores).item() == pytest.approx(1.0)
    tie = sampling.apply_top_k(torch.tensor([[1.0, 3.0, 3.0, 0.0]]), 1)
    assert sampling.kept(tie).item() == 2  # ties survive top-k


@pytest.mark.parametrize("params", PARAMS)
def test_stage_effects_follow_each_stage_on_the_whole_vocabulary(params):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 500, generator=g) * 3
    previous = torch.randint(0, 500, (1, 30), generator=g)
    stages = sampling.stage_scores(logits, previous, sampling.SamplingSettings(do_sample=True, **params))
    effects = sampling.stage_effects(stages)
    assert list(effects) == list(sampling.STAGES)
    assert effects["raw"] == (500, 1.0) and effects["temperature"][0] == 500
    k, p = params["top_k"], params["top_p"]
    assert effects["top_k"][0] == (min(k, 500) if k else 500)  # random scores: no ties
    assert effects["top_p"][1] >= p - 1e-6  # top-p keeps at least p of the mass it was given
    assert effects["final"][0] == int((stages["final"] > 0).sum()) == effects["top_p"][0]
    # the share kept is the previous stage's probability summed over the survivors
    before = torch.softmax(stages["top_k"], -1)[0]
    assert effects["top_p"][1] == pytest.approx(before[torch.isfinite(stages["top_p"][0])].sum().item())


def test_penalized_ids_are_the_distinct_ids_so_far_unless_the_penalty_is_off():
    assert sampling.penalized_ids([5, 3, 5, 9], 1.3) == {3, 5, 9}
    assert sampling.penalized_ids([5, 3, 5, 9], 1.0) == set()


# --- The chain, declared once, and the one choice ---------------------------------------------


def test_stages_greedy_subset_and_plot_panels_derive_from_the_chain():
    from tracer.viz.plots import sampling as panels

    assert sampling.STAGES == tuple(stage.name for stage in sampling.CHAIN)
    kinds = [stage.kind for stage in sampling.CHAIN]
    assert kinds == [sampling.OUTPUT, sampling.PROCESSOR] + [sampling.WARPER] * 3 + [sampling.DISTRIBUTION]
    assert sampling.GREEDY_STAGES == ("raw", "repetition_penalty", "final")  # processors, then argmax
    assert sampling.LOGIT_STAGES == ("raw", "repetition_penalty")
    assert panels.GREEDY_STAGES == sampling.GREEDY_STAGES and panels.LOGIT_STAGES == sampling.LOGIT_STAGES


def test_the_sampler_runs_whatever_the_chain_declares(monkeypatch):
    """stage_scores and next_token loop over CHAIN: a stage taken out of it is gone from both."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 200, generator=g) * 3
    prev = torch.randint(0, 200, (1, 10), generator=g)
    s = sampling.SamplingSettings(do_sample=True, temperature=0.5, top_k=3, top_p=1.0)
    full = sampling.stage_scores(logits, prev, s)
    assert list(full) == list(sampling.STAGES) and int(sampling.kept(full["top_k"])) == 3
    monkeypatch.setattr(sampling, "CHAIN", tuple(st for st in sampling.CHAIN if st.name != "top_k"))
    cut = sampling.stage_scores(logits, prev, s)
    assert "top_k" not in cut and int(sampling.kept(cut["top_p"])) == 200
    drawn = {sampling.next_token(logits, prev, s, torch.Generator().manual_seed(n)).item() for n in range(40)}
    assert len(drawn) > 3  # top-k no longer limits the draws to 3 tokens


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sample"])
def test_untraced_and_traced_paths_make_the_same_choice(do_sample):
    """next_token (capture="off") and pick_from_stages (every traced policy) are one choice."""
    g = torch.Generator().manual_seed(8)
    prev = torch.randint(0, 300, (1, 20), generator=g)
    s = sampling.SamplingSettings(do_sample=do_sample, temperature=0.9, top_k=30, top_p=0.9, repetition_penalty=1.2)
    for seed in range(30):
        logits = torch.randn(1, 300, generator=g) * 2
        a = sampling.next_token(logits, prev, s, torch.Generator().manual_seed(seed))
        b = sampling.pick_from_stages(sampling.stage_scores(logits, prev, s), s, torch.Generator().manual_seed(seed))
        assert torch.equal(a, b)


@pytest.mark.parametrize("V", [2, 7, 1000, 49152])
def test_the_exponential_race_draws_what_multinomial_draws(V):
    """``choose`` draws as ATen's multinomial does for one sample (probs / Exponential(1), then
    argmax): the same tokens from the same generator, which is left in the same state; rows with
    zeros (cut tokens) included."""
    g = torch.Generator().manual_seed(V)
    probs = torch.softmax(torch.randn(3, V, generator=g) * 4, dim=-1)
    probs[1] = probs[1].masked_fill(probs[1] < probs[1].median(), 0.0)  # half the tokens cut
    for seed in range(20):
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for _ in range(3):
            got = sampling.choose(probs, do_sample=True, generator=ours)
            want = torch.multinomial(probs, num_samples=1, generator=theirs).squeeze(-1)
            assert torch.equal(got, want)
            assert torch.equal(sampling.choose(probs[0], do_sample=True, generator=ours),
                               torch.multinomial(probs[0], 1, generator=theirs)[0])
        assert torch.equal(ours.get_state(), theirs.get_state())


def test_a_draw_reads_nothing_back_from_the_device():
    """multinomial validates its input with scalar reads (each a GPU sync); the race needs none.
    Device: CPU, where the profiler still records those reads."""
    from torch.profiler import ProfilerActivity, profile

    probs = torch.softmax(torch.randn(1, 500), -1)
    g = torch.Generator().manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        sampling.choose(probs, do_sample=True, generator=g)
        sampling.next_token(probs.log(), torch.tensor([[1, 2]]),
                            sampling.SamplingSettings(do_sample=True, top_p=0.9, repetition_penalty=1.3), g)
    assert "aten::_local_scalar_dense" not in [e.name for e in prof.events()]
