"""Generation tests: the KV cache (whole and chunked prefill) reproduces cache-free greedy decoding; sampling
controls (seed, top-k, top-p, temperature, stop tokens) and streaming behave."""

from __future__ import annotations

import pytest
import torch

from llm.models import DecoderModel, KVCache
from llm.models.generation import sample_next


def greedy_without_cache(model: DecoderModel, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Reference: argmax over a full forward of the whole sequence, every step."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("use_moe", [False, True])
@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_cached_greedy_equals_uncached(use_moe, chunk):
    torch.manual_seed(0)
    model = DecoderModel.tiny(use_moe=use_moe).eval()
    prompt = torch.randint(0, 256, (2, 7))
    expected = greedy_without_cache(model, prompt, 12)
    got = model.generate(prompt, 12, temperature=0, prefill_chunk_size=chunk)
    assert torch.equal(got, expected)
    assert torch.equal(model.generate(prompt, 12, temperature=0, use_cache=False), expected)


def test_chunked_prefill_logits_match_full_forward():
    torch.manual_seed(0)
    model = DecoderModel.tiny().eval()
    ids = torch.randint(0, 256, (1, 10))
    full = model(ids)
    cache = KVCache.for_model(model, 1, 10)
    parts = [model(ids[:, s : s + 4], cache=cache) for s in range(0, 10, 4)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="overflow"):
        model(ids[:, :1], cache=cache)


def test_single_prompt_streams_ints_and_respects_stop_tokens():
    torch.manual_seed(0)
    model = DecoderModel.tiny()
    prompt = torch.randint(0, 256, (5,))
    greedy = model.generate(prompt, 6, temperature=0)
    assert greedy.shape == (11,)
    stream = list(model.generate_stream(prompt, 6, temperature=0))
    assert all(isinstance(t, int) for t in stream)
    assert stream == greedy[5:].tolist()
    stop = stream[2]
    stopped = list(model.generate_stream(prompt, 6, temperature=0, stop_tokens=[stop]))
    assert stopped == stream[: stream.index(stop) + 1]
    assert model.training  # generation restores the caller's mode


def test_batch_stop_pads_finished_rows_with_their_stop_token():
    torch.manual_seed(0)
    model = DecoderModel.tiny()
    prompt = torch.randint(0, 256, (2, 4))
    free = model.generate(prompt, 5, temperature=0)[:, 4:]
    stop = int(free[0, 1])
    out = model.generate(prompt, 5, temperature=0, stop_tokens=[stop])[:, 4:]
    assert out[0, 1] == stop and (out[0, 1:] == stop).all()


def test_seeded_sampling_is_reproducible_and_filters_work():
    torch.manual_seed(0)
    model = DecoderModel.tiny()
    prompt = torch.randint(0, 256, (1, 4))
    a = model.generate(prompt, 8, temperature=1.0, seed=7)
    b = model.generate(prompt, 8, temperature=1.0, seed=7)
    assert torch.equal(a, b)
    greedy = model.generate(prompt, 8, temperature=0)
    assert torch.equal(model.generate(prompt, 8, temperature=1.0, top_k=1, seed=3), greedy)
    assert torch.equal(model.generate(prompt, 8, temperature=1.0, top_p=1e-6, seed=3), greedy)


def test_sample_next_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=gen)) for _ in range(200)}
    assert draws == {0, 1}
    # probs ~ [0.64, 0.24, 0.09, 0.03]: top_p=0.8 keeps the first two (0.64 < 0.8 <= 0.88)
    draws = {int(sample_next(logits, 1.0, top_p=0.8, generator=gen)) for _ in range(200)}
    assert draws == {0, 1}
    draws = {int(sample_next(logits, 1.0, generator=gen)) for _ in range(400)}
    assert draws == {0, 1, 2, 3}
    assert int(sample_next(logits, 0.0)) == 0


def test_a_padded_vocabulary_never_yields_an_id_past_the_tokenizers():
    """The model has 4 ids, the tokenizer 2: ids 2 and 3 are no text, even where they are the likeliest."""
    logits = torch.tensor([[0.0, 1.0, 9.0, 8.0]])
    gen = torch.Generator().manual_seed(0)
    assert int(sample_next(logits, 0.0, vocab_limit=2)) == 1  # greedy: the best decodable id, not the best id
    draws = {int(sample_next(logits, 1.0, top_k=3, generator=gen, vocab_limit=2)) for _ in range(200)}
    assert draws == {0, 1}
    assert {int(sample_next(logits, 1.0, generator=gen)) for _ in range(200)} >= {2, 3}  # without the limit
    torch.manual_seed(0)
    model = DecoderModel.tiny(vocab_size=300).eval()
    out = model.generate(torch.tensor([1, 2, 3]), 60, temperature=2.0, seed=0, vocab_limit=256)
    assert int(out.max()) < 256
    assert int(model.generate(torch.tensor([1, 2, 3]), 60, temperature=2.0, seed=0).max()) >= 256


# -- the context window slides ---------------------------------------------------------------------------------
def next_greedy(model: DecoderModel, ids: torch.Tensor) -> torch.Tensor:
    """A fresh greedy prediction from `ids` (B, T), no cache: the reference a slid window must reproduce."""
    with torch.no_grad():
        return model(ids)[:, -1].argmax(-1)  # (B,)


@pytest.mark.parametrize("chunk", [None, 5])
def test_past_the_context_the_window_slides_and_matches_a_fresh_generation_from_it(chunk):
    torch.manual_seed(0)
    model = DecoderModel.tiny(max_seq_len=16).eval()
    prompt = torch.randint(0, 256, (2, 10))
    slides: list[int] = []
    out = model.generate(prompt, 20, temperature=0, prefill_chunk_size=chunk, on_slide=slides.append)
    # Token i is predicted from 10 + i tokens: i = 7 is the first whose window (16) drops one; reported once.
    assert out.shape == (2, 30) and slides == [7]
    for i in range(20):
        context = out[:, : 10 + i][:, -16:]
        assert torch.equal(next_greedy(model, context), out[:, 10 + i]), f"token {i}"
    uncached: list[int] = []
    assert torch.equal(model.generate(prompt, 20, temperature=0, use_cache=False, on_slide=uncached.append), out)
    assert uncached == [7]


def test_a_prompt_longer_than_the_context_keeps_its_last_window():
    torch.manual_seed(0)
    model = DecoderModel.tiny(max_seq_len=16).eval()
    prompt = torch.randint(0, 256, (40,))
    slides: list[int] = []
    out = model.generate(prompt, 6, temperature=0, on_slide=slides.append)
    assert slides == [0]
    assert torch.equal(out[40:], model.generate(prompt[-16:], 6, temperature=0)[16:])


def test_generation_inside_the_context_never_slides():
    torch.manual_seed(0)
    model = DecoderModel.tiny(max_seq_len=16).eval()
    slides: list[int] = []
    # 10 + 6 positions: the 6th token is predicted from 15 tokens and is never fed back, so nothing slides.
    assert model.generate(torch.randint(0, 256, (10,)), 6, temperature=0, on_slide=slides.append).shape == (16,)
    assert model.generate(torch.randint(0, 256, (16,)), 1, temperature=0, on_slide=slides.append).shape == (17,)
    assert slides == []
