"""KV-cache decoding on an :class:`~megallama.inference.loader.InferenceModel` at any (tp, pp).

Every stage keeps a KV cache of its own blocks' (TP-sharded) KV heads. A batch of prompts of
different lengths is left-padded: every sequence's RoPE positions start at its first real token
and a boolean mask hides the padding (Llama has no pad token, so the pad id is arbitrary and never
attended to). The last stage gathers the last position's logits over TP and picks the next tokens
-- greedy (temperature 0) or sampled (temperature, top-k, top-p) with a generator seeded
identically on every rank -- then broadcasts them over the pipeline, so every rank of every
stage holds the same tokens and feeds the same next step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from megallama.config import ModelConfig
from megallama.data.chat import encode_dialog_prompt
from megallama.data.tokenizer import Tokenizer
from megallama.inference.loader import InferenceModel, as_inference_model
from megallama.model.llama import Transformer
from megallama.parallel import mappings


class GenerationError(ValueError):
    """Input that generation cannot run on: empty or too long prompts, mismatched tokenizer..."""


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy when ``temperature`` is 0, otherwise sampled from the
    softmax at ``temperature`` restricted to the ``top_k`` most likely tokens (0: all) and to the
    smallest set whose probability reaches ``top_p`` (1.0: all)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        # written so that nan fails too (it passes every ``<`` test)
        if not 0 <= self.temperature < math.inf:
            raise GenerationError(f"temperature={self.temperature} must be finite and >= 0")
        if self.top_k < 0:
            raise GenerationError(f"top_k={self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p={self.top_p} must be in (0, 1]")


def chat_prompt(tokenizer: Tokenizer, user: str, system: str | None = None, *,
                allow_tags: bool = False) -> list[int]:
    """The prompt ids of one user turn (after an optional system prompt) in the tokenizer's chat
    format -- Llama 2's ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST]``, or
    Llama 3's header/``<|eot_id|>`` messages ending with the assistant's header: exactly what
    :func:`megallama.data.chat.encode_dialog_prompt` gives, the definition training data uses.
    A chat tag inside ``user`` or ``system`` raises ChatTagError unless ``allow_tags``."""
    system_turn = [] if system is None else [{"role": "system", "content": system}]
    return encode_dialog_prompt(tokenizer, [*system_turn, {"role": "user", "content": user}],
                                allow_tags=allow_tags)


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row of ``logits`` [b, vocab] (full vocabulary, identical on all ranks)."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= sampling.top_p  # keeps the token crossing top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    # sample on the CPU generator: the same draw on every rank and every device type
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, cfg: ModelConfig) -> None:
    """Raise GenerationError for empty prompts, out-of-vocabulary ids or a context overflow."""
    if not prompts:
        raise GenerationError("no prompts")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens={max_new_tokens} must be >= 1")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty (no tokens); give non-blank text")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise GenerationError(f"prompt {i}: token id {bad[0]} outside the model's vocabulary "
                                  f"[0, {cfg.vocab_size}) -- tokenizer/model mismatch?")
        if len(p) + max_new_tokens > cfg.max_seq_len:
            raise GenerationError(f"prompt {i}: {len(p)} tokens + {max_new_tokens} new tokens "
                                  f"exceed the model's context of {cfg.max_seq_len}; shorten "
                                  "the prompt or lower --max-new-tokens")


@dataclass
class _Batch:
    """The left-padded token buffer of a batch and what attention needs to ignore the padding."""

    tokens: torch.Tensor  # [b, total], pad id 0 (never attended)
    positions: torch.Tensor  # [b, total] RoPE positions, 0 at each sequence's first real token
    mask: torch.Tensor  # [b, 1, total, total] True = attend


def _left_padded(prompts: Sequence[Sequence[int]], total: int, device: torch.device) -> _Batch:
    bsz, longest = len(prompts), max(len(p) for p in prompts)
    tokens = torch.zeros(bsz, total, dtype=torch.long, device=device)
    real = torch.zeros(bsz, total, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):longest] = torch.tensor(list(p), dtype=torch.long)
        real[i, longest - len(p):] = True
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    # a query sees earlier real tokens, and itself (so pad rows are never fully masked: no NaN)
    mask = (causal & real[:, None, :]) | torch.eye(total, dtype=torch.bool, device=device)
    return _Batch(tokens, positions, mask[:, None])


def _pick(model: InferenceModel, logits: torch.Tensor | None, bsz: int, sampling: Sampling,
          generator: torch.Generator | None) -> torch.Tensor:
    """The next token of every sequence: chosen on the last stage from the last position's
    logits over the true vocabulary (gathered over TP), then broadcast over the pipeline."""
    if model.is_last_stage:
        assert logits is not None
        last = mappings.gather_from_tp(logits[:, -1].contiguous(), model.tp.group)
        nxt = next_token(last[..., : model.cfg.vocab_size], sampling, generator)
    else:
        nxt = torch.empty(bsz, dtype=torch.long, device=model.device)
    return model.broadcast_from_last(nxt)


@torch.no_grad()
def generate(model: InferenceModel | Transformer, prompts: Sequence[Sequence[int]],
             max_new_tokens: int, sampling: Sampling = Sampling(),
             eos_id: int | Sequence[int] | None = None,
             use_cache: bool = True,
             on_step: Callable[[torch.Tensor], None] | None = None) -> list[list[int]]:
    """New tokens for each prompt (token ids), stopping at ``eos_id`` (not included) or after
    ``max_new_tokens``. ``eos_id`` may be several stop ids (a tokenizer's ``stop_ids``: Llama 3
    ends a chat turn with ``<|eot_id|>`` and a text with ``<|end_of_text|>``). Collective over
    the model's TP group and pipeline; every rank returns the same lists. A plain single-stage
    :class:`Transformer` is accepted as well.

    ``use_cache=False`` recomputes the whole (padded) sequence at every step -- the reference the
    cached path must equal. ``on_step`` sees each step's chosen tokens [b] (for streaming).
    """
    if isinstance(model, Transformer):
        model = as_inference_model(model)
    check_prompts(prompts, max_new_tokens, model.cfg)
    bsz, longest = len(prompts), max(len(p) for p in prompts)
    total = longest + max_new_tokens
    batch = _left_padded(prompts, total, model.device)
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.temperature > 0 else None
    stops = _stop_ids(eos_id)
    stop_ids = torch.tensor(stops, dtype=torch.long, device=model.device)
    done = torch.zeros(bsz, dtype=torch.bool, device=model.device)
    out = torch.zeros(bsz, max_new_tokens, dtype=torch.long, device=model.device)
    cache = model.new_cache(bsz, total) if use_cache else None
    start, n_out = 0, 0
    for step in range(max_new_tokens):
        end = longest + step
        if cache is None:  # recompute everything so far in a throwaway cache
            step_cache, start = model.new_cache(bsz, end), 0
        else:
            step_cache = cache
        step_cache.prepare(batch.positions[:, start:end], batch.mask[:, :, start:end, :end])
        logits = model(batch.tokens[:, start:end], step_cache)
        nxt = _pick(model, logits, bsz, sampling, generator)
        if stops:
            nxt = nxt.masked_fill(done, stops[0])
        batch.tokens[:, end] = nxt
        out[:, step] = nxt
        n_out = step + 1
        if on_step is not None:
            on_step(nxt)
        start = end
        if stops:
            done |= torch.isin(nxt, stop_ids)
            if bool(done.all()):
                break
    return [_until_stop(row, stops) for row in out[:, :n_out].tolist()]


def _stop_ids(eos_id: int | Sequence[int] | None) -> tuple[int, ...]:
    if eos_id is None:
        return ()
    return tuple(int(i) for i in eos_id) if isinstance(eos_id, Sequence) else (int(eos_id),)


def _until_stop(row: list[int], stops: tuple[int, ...]) -> list[int]:
    ends = [i for i, t in enumerate(row) if t in stops]
    return row[: ends[0]] if ends else row


__all__ = ["GenerationError", "Sampling", "chat_prompt", "check_prompts", "generate",
           "next_token"]
