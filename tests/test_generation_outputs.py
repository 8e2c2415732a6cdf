"""generate()'s dict outputs for prompts with an image: greedy, sampling and beam search, with and without cache.

transformers' GenerationTesterMixin is not in its source distribution, so these are our own checks of what it
documents for GenerateDecoderOnlyOutput / GenerateBeamDecoderOnlyOutput: one scores, logits, attentions and
hidden_states entry per generated token; scores and logits (batch * beams, vocab); attentions per layer
(batch * beams, heads, new positions, positions so far); hidden_states per layer plus the embeddings
(batch * beams, new positions, hidden); sequences that follow the scores; beams with sequences_scores and
beam_indices; and the same tokens with the cache as without it.
"""

import pytest
import torch
from conftest import build_model, image_ids

NEW_TOKENS = 4
ALL_OUTPUTS = dict(return_dict_in_generate=True, output_scores=True, output_logits=True, output_attentions=True,
                   output_hidden_states=True)


def prompts(config):
    """Two prompts of one image each (BOS, image ids, 3 text ids), and their images."""
    ids = torch.tensor([[1, *image_ids(config), 20, 21, 22], [1, *image_ids(config), 30, 31, 32]])
    size = config.vision_config.image_size
    pixel_values = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    return ids, pixel_values


def generate(model, use_cache: bool, seed: int = 0, **kwargs):
    ids, pixel_values = prompts(model.config)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=pixel_values, attention_mask=torch.ones_like(ids),
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, use_cache=use_cache,
                             **ALL_OUTPUTS, **kwargs)
    return ids, out


def check_per_step_shapes(model, out, prompt_length: int, rows: int, use_cache: bool) -> None:
    """rows: batch * beams. With a cache the first step sees the prompt and each later step one new token;
    without, every step sees the whole sequence so far."""
    text = model.config.text_config
    vocab = model.get_output_embeddings().out_features
    for outputs in (out.scores, out.logits, out.attentions, out.hidden_states):
        assert len(outputs) == NEW_TOKENS
    for step in range(NEW_TOKENS):
        keys = prompt_length + step
        queries = keys if step == 0 or not use_cache else 1
        assert out.scores[step].shape == out.logits[step].shape == (rows, vocab)
        assert len(out.attentions[step]) == text.num_hidden_layers
        for weights in out.attentions[step]:
            assert weights.shape == (rows, text.num_attention_heads, queries, keys)
            torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))  # softmax rows
            future = torch.ones(queries, keys, dtype=torch.bool).triu(keys - queries + 1)
            assert not weights[..., future].any()  # causal: no weight on later positions
        assert len(out.hidden_states[step]) == text.num_hidden_layers + 1
        for hidden in out.hidden_states[step]:
            assert hidden.shape == (rows, queries, text.hidden_size)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
def test_greedy_outputs_follow_the_argmax_of_each_steps_scores(version, use_cache):
    model = build_model(version)
    ids, out = generate(model, use_cache, do_sample=False)
    length = ids.shape[1]
    assert out.sequences.shape == (2, length + NEW_TOKENS)
    assert torch.equal(out.sequences[:, :length], ids)
    check_per_step_shapes(model, out, length, rows=2, use_cache=use_cache)
    eos = torch.tensor(model.generation_config.eos_token_id).flatten()
    for step in range(NEW_TOKENS):
        scores, logits = out.scores[step], out.logits[step]
        assert torch.equal(out.sequences[:, length + step], scores.argmax(-1))
        # logits are the raw ones; scores differ only where min_new_tokens masks the end-of-sequence ids
        masked = ~torch.isfinite(scores)
        assert masked[:, eos].all() and masked.sum() == masked[:, eos].sum()
        torch.testing.assert_close(scores[~masked], logits[~masked])
    # the last hidden state of the last layer, through the LM head, gives the step's logits
    for step in range(NEW_TOKENS):
        last = out.hidden_states[step][-1][:, -1]
        torch.testing.assert_close(model.get_output_embeddings()(last), out.logits[step], rtol=1e-5, atol=1e-5)


def test_greedy_with_cache_matches_without(version):
    model = build_model(version)
    _, cached = generate(model, True, do_sample=False)
    _, uncached = generate(model, False, do_sample=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(cached.hidden_states[-1], uncached.hidden_states[-1]):
        torch.testing.assert_close(a[:, -1], b[:, -1], rtol=1e-4, atol=1e-4)  # the newest position


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
def test_sampling_draws_from_the_warped_scores_and_is_reproducible_with_a_seed(version, use_cache):
    model = build_model(version)
    sampling = dict(do_sample=True, temperature=0.7, top_k=5, top_p=1.0)
    ids, out = generate(model, use_cache, seed=3, **sampling)
    _, again = generate(model, use_cache, seed=3, **sampling)
    length = ids.shape[1]
    assert torch.equal(out.sequences, again.sequences)
    check_per_step_shapes(model, out, length, rows=2, use_cache=use_cache)
    for step in range(NEW_TOKENS):
        scores, logits = out.scores[step], out.logits[step]
        kept = torch.isfinite(scores)
        assert torch.equal(kept.sum(-1), torch.full((2,), 5))  # top_k
        assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, logits.topk(5).indices, True))
        torch.testing.assert_close(scores[kept], logits[kept] / 0.7)  # temperature
        chosen = out.sequences[:, length + step]
        assert kept.gather(-1, chosen[:, None]).all()  # every drawn token is one the warped scores allow
    draws = {tuple(generate(model, use_cache, seed=seed, **sampling)[1].sequences[:, length:].flatten().tolist())
             for seed in range(4)}
    assert len(draws) > 1  # it samples: other seeds draw other tokens


def test_sampling_with_cache_matches_without(version):
    model = build_model(version)
    sampling = dict(do_sample=True, temperature=0.7, top_k=5, top_p=1.0)
    _, cached = generate(model, True, seed=5, **sampling)
    _, uncached = generate(model, False, seed=5, **sampling)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
def test_beam_search_returns_ranked_beams_whose_scores_add_up(version, use_cache):
    model = build_model(version)
    ids, out = generate(model, use_cache, do_sample=False, num_beams=3, num_return_sequences=2, length_penalty=1.0)
    length = ids.shape[1]
    assert out.sequences.shape == (4, length + NEW_TOKENS)
    assert torch.equal(out.sequences[:, :length], ids.repeat_interleave(2, dim=0))
    check_per_step_shapes(model, out, length, rows=2 * 3, use_cache=use_cache)
    assert out.sequences_scores.shape == (4,)
    assert out.beam_indices.shape[0] == 4 and out.beam_indices.shape[1] >= NEW_TOKENS
    for row in range(4):
        beams = out.beam_indices[row, :NEW_TOKENS]
        prompt = row // 2
        assert ((beams >= 3 * prompt) & (beams < 3 * prompt + 3)).all()  # beams of this row's prompt
        # scores hold each beam's per-token log-probabilities: along the beam path they add up to the
        # sequence's score times its generated length (length_penalty 1)
        path = torch.stack([out.scores[step][beams[step], out.sequences[row, length + step]]
                            for step in range(NEW_TOKENS)])
        torch.testing.assert_close(path.sum() / NEW_TOKENS, out.sequences_scores[row], rtol=1e-4, atol=1e-4)
    assert (out.sequences_scores[0::2] >= out.sequences_scores[1::2]).all()  # best beam first
    assert not torch.equal(out.sequences[0], out.sequences[1])  # two different beams


def test_transition_scores_of_greedy_and_beam_search_are_the_chosen_tokens_log_probabilities(version):
    model = build_model(version)
    for kwargs in (dict(do_sample=False), dict(do_sample=False, num_beams=3, length_penalty=1.0)):
        ids, out = generate(model, True, **kwargs)
        beams = getattr(out, "beam_indices", None)
        transition = model.compute_transition_scores(out.sequences, out.scores, beams, normalize_logits=False)
        assert transition.shape == (2, NEW_TOKENS)
        rows = beams[:, :NEW_TOKENS] if beams is not None else torch.arange(2)[:, None].expand(2, NEW_TOKENS)
        chosen = torch.stack([out.scores[step][rows[:, step], out.sequences[:, ids.shape[1] + step]]
                              for step in range(NEW_TOKENS)], dim=1)
        torch.testing.assert_close(transition, chosen)
        if beams is not None:  # the scores of a beam add up to its sequence score (length penalty 1)
            torch.testing.assert_close(transition.sum(1) / NEW_TOKENS, out.sequences_scores, rtol=1e-4, atol=1e-4)


def test_beam_search_with_cache_matches_without(version):
    model = build_model(version)
    beam = dict(do_sample=False, num_beams=3, num_return_sequences=2, length_penalty=1.0)
    _, cached = generate(model, True, **beam)
    _, uncached = generate(model, False, **beam)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.equal(cached.beam_indices, uncached.beam_indices)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, rtol=1e-4, atol=1e-4)


def test_generation_from_inputs_embeds_matches_input_ids(version):
    """A text prompt given as embeddings decodes to the same tokens (generate's input_ids then hold only the
    new tokens)."""
    model = build_model(version)
    ids = torch.tensor([[1, 20, 21, 22, 23], [1, 30, 31, 32, 33]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        from_ids = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                  min_new_tokens=NEW_TOKENS, do_sample=False)
        from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask,
                                     max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(from_embeds[:, -NEW_TOKENS:], from_ids[:, ids.shape[1]:])
