"""Autoregressive generation for :class:`~llm.models.decoder.DecoderModel`: KV cache, sampling, streaming.

``generate_stream`` is the primitive (prefill, optionally in chunks, then one token per step against the cache)
and yields tokens as they are produced, so a CLI can print them as they arrive; ``generate`` collects it.

Sampling: temperature (0 = greedy), then top-k, then top-p (nucleus), drawn from a seeded ``torch.Generator``.
A model's vocabulary may be larger than its tokenizer's (the embedding padded to a multiple of 64, say): the ids
past the tokenizer's are no text, so with ``vocab_limit`` (the tokenizer's size) they are never drawn, greedy
decoding included; their logits are masked before temperature, top-k and top-p.
Grad mode and train/eval mode are switched around each forward only, never across a ``yield``, so code running
between streamed tokens sees the caller's own settings.

The model never sees more than its context (``max_seq_len``): past it, the window slides, and each token is
predicted from the last ``max_seq_len`` tokens only, exactly as a fresh generation from that window would predict
it. Positions beyond the ones it was trained on would otherwise turn the text into gibberish without a word. The
cache holds at most ``max_seq_len`` positions; once it is full, every further token re-prefills the kept window
(rotary keys are tied to their absolute positions, and the deeper layers' keys to the tokens that were dropped, so
the cached ones cannot be shifted), which costs one forward over the window per token, as decoding without a cache
does. ``on_slide`` tells the caller when that starts, so a CLI can say so.

A sliding-window model (Mistral, ``model.sliding_window``) keeps the cache as it is: each attention layer masks
every cached key but the last ``sliding_window`` (`llm.models.layers.sliding_window_mask`, the same band as in
training), so a cached step attends exactly what a full forward over the sequence would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn


# -------------------------------------------------------------------------------------------------------- cache
class LayerKVCache:
    """Preallocated keys/values of one attention layer; ``update`` appends a block and returns all so far."""

    def __init__(
        self, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
        device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
    ) -> None:
        self.k = torch.zeros(batch_size, num_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0  # a Python int: slicing by it needs no device sync

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k``/``v`` (B, n_kv, T, head_dim); return all cached keys/values (B, n_kv, length, head_dim)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} positions > capacity {self.max_len}")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reset(self) -> None:
        """Forget every cached position (the storage is kept and overwritten by the next updates)."""
        self.length = 0


class KVCache:
    """One :class:`LayerKVCache` per decoder layer; ``length`` is the number of positions already cached."""

    def __init__(self, layers: list[LayerKVCache]) -> None:
        self.layers = layers

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_len: int) -> KVCache:
        p = model.embed_tokens.weight
        return cls([
            LayerKVCache(batch_size, b.self_attn.num_kv_heads, b.self_attn.head_dim, max_len, p.device, p.dtype)
            for b in model.layers
        ])


# ----------------------------------------------------------------------------------------------------- sampling
def sample_next(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    generator: torch.Generator | None = None, vocab_limit: int | None = None,
) -> Tensor:
    """Next token ids (B,) from last-position ``logits`` (B, V); with ``vocab_limit``, only ids below it."""
    logits = logits.float()
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        if vocab_limit < 1:
            raise ValueError(f"vocab_limit must be >= 1, got {vocab_limit}")
        logits = logits[:, :vocab_limit]  # (B, vocab_limit): the ids kept are the first ones, unchanged
    if temperature <= 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)  # (B, V)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
        # Drop a token when the tokens ranked above it already reach top_p; the top token always stays.
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p  # (B, V)
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


# --------------------------------------------------------------------------------------------------------- mixin
class GenerationMixin:
    """``generate`` / ``generate_stream`` for DecoderModel (kept here so decoder.py stays about the network). The
    methods' `self` is the decoder; it is typed as a module because decoder.py imports this one, not the reverse."""

    def _forward_no_grad(self: nn.Module, ids: Tensor, cache: KVCache | None) -> Tensor:
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self(ids, cache=cache)[:, -1]  # (B, V)
        finally:
            self.train(was_training)

    def _prefill(self: nn.Module, ids: Tensor, cache: KVCache, chunk: int | None) -> Tensor:
        """Feed ``ids`` (B, T) to an empty ``cache`` in blocks of ``chunk`` tokens; the last position's logits."""
        chunk = chunk or ids.shape[1]
        logits = None
        for s in range(0, ids.shape[1], chunk):
            logits = self._forward_no_grad(ids[:, s : s + chunk], cache)  # (B, V)
        assert logits is not None, "empty prompt: generation needs at least one input token"
        return logits

    def generate_stream(
        self: nn.Module,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_tokens: Iterable[int] | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        prefill_chunk_size: int | None = None,
        on_slide: Callable[[int], None] | None = None,
        vocab_limit: int | None = None,
    ) -> Iterator[int | Tensor]:
        """Yield generated tokens one step at a time.

        ``input_ids``: a 1-D prompt (T,) yields Python ints; a batch (B, T) of equal-length prompts yields (B,)
        LongTensors. Stops after ``max_new_tokens`` or once every sequence has produced one of ``stop_tokens``
        (the stop token is yielded; later steps of already-stopped rows repeat that stop token).
        ``seed`` builds a fresh generator; ``generator`` is used as is. ``prefill_chunk_size`` feeds the prompt to
        the cache in blocks of that many tokens (bounds prefill memory). ``use_cache=False`` recomputes the full
        window every step (the reference the cache is tested against).
        Each token is predicted from the last ``max_seq_len`` tokens at most (the sliding window of the module
        docstring); ``on_slide(i)`` is called once, before the first token predicted from a window that dropped
        earlier tokens, with that token's 0-based index among the generated ones (0: the prompt alone was longer).
        ``vocab_limit`` (the tokenizer's vocabulary size) keeps the ids a padded vocabulary adds from being drawn.
        """
        single = input_ids.dim() == 1
        ids = input_ids[None] if single else input_ids  # (B, T)
        device = self.embed_tokens.weight.device
        ids = ids.to(device)
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        stops = torch.tensor(sorted(set(stop_tokens or ())), dtype=torch.long, device=device)
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)  # (B,)
        last_stop = torch.zeros(ids.shape[0], dtype=torch.long, device=device)  # (B,)
        window = int(self.max_seq_len)
        slid = False

        def slides(index: int) -> bool:
            """Whether the next prediction drops tokens from the window; reports the first time."""
            nonlocal slid
            if ids.shape[1] <= window:
                return False
            if not slid and on_slide is not None:
                on_slide(index)
            slid = True
            return True

        capacity = min(ids.shape[1] + max_new_tokens, window)
        cache = KVCache.for_model(self, ids.shape[0], capacity) if use_cache else None
        logits = None
        if cache is not None and max_new_tokens > 0:
            slides(0)
            logits = self._prefill(ids[:, -window:], cache, prefill_chunk_size)
        for step in range(max_new_tokens):
            if cache is None:
                slides(step)
                logits = self._forward_no_grad(ids[:, -window:], None)
            assert logits is not None, "empty prompt: generation needs at least one input token"
            nxt = sample_next(logits, temperature, top_k, top_p, generator, vocab_limit)  # (B,)
            nxt = torch.where(finished, last_stop, nxt)
            if stops.numel():
                hit = torch.isin(nxt, stops) & ~finished
                last_stop = torch.where(hit, nxt, last_stop)
                finished |= hit
            ids = torch.cat([ids, nxt[:, None]], dim=1)  # (B, T + 1)
            yield int(nxt[0]) if single else nxt
            if step + 1 == max_new_tokens or (stops.numel() and bool(finished.all())):
                return  # no forward for a token that will not be drawn (nor a slide that did not happen)
            if cache is None:
                continue
            if slides(step + 1):  # the cache is full: start it again from the kept window
                cache.reset()
                logits = self._prefill(ids[:, -window:], cache, prefill_chunk_size)
            else:
                logits = self._forward_no_grad(nxt[:, None], cache)  # (B, V)

    def generate(self: nn.Module, input_ids: Tensor, max_new_tokens: int, **kwargs: object) -> Tensor:
        """Prompt plus generated tokens: (T + n,) for a 1-D prompt, (B, T + n) for a batch. Same keywords as
        :meth:`generate_stream`; ``temperature=0`` is greedy."""
        new = list(self.generate_stream(input_ids, max_new_tokens, **kwargs))  # type: ignore[arg-type]
        if input_ids.dim() == 1:
            return torch.cat([input_ids, torch.tensor(new, dtype=input_ids.dtype, device=input_ids.device)])
        if not new:
            return input_ids
        return torch.cat([input_ids, torch.stack(new, dim=1).to(input_ids.device)], dim=1)
