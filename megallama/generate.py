"""``python -m megallama.generate --checkpoint DIR --prompt TEXT ...`` -- text from a checkpoint.

Runs at any tensor-parallel size (``torchrun --nproc-per-node N``: tp = N, pp = 1). The model is a
megallama weights checkpoint (a step directory, a checkpoints/ root or a run directory) or, with
``--format meta|hf``, a Meta or Hugging Face directory streamed through the reshard readers.

Decoding keeps a KV cache of each rank's KV heads. A batch of prompts of different lengths is
left-padded: every sequence's RoPE positions start at its first real token and a boolean mask hides
the padding (Llama has no pad token, so the pad id is arbitrary and never attended to). Greedy
(``--temperature 0``) or sampled (temperature, top-k, top-p) decoding on logits gathered over TP;
sampling uses a generator seeded identically on every rank, so all ranks pick the same tokens.
Only rank 0 prints: a single prompt is streamed token by token, a batch is printed at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megallama.config import ConfigError, ModelConfig, check_tp_layout
from megallama.model.llama import KVCache, Transformer
from megallama.parallel import mappings
from megallama.parallel.layers import TensorParallel

if TYPE_CHECKING:
    from megallama.checkpoint.convert import Source

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


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
        if self.temperature < 0:
            raise GenerationError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise GenerationError(f"top_k={self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p={self.top_p} must be in (0, 1]")


def chat_prompt(user: str, system: str | None = None) -> str:
    """The Llama-2-chat format of one user turn (BOS is added by the tokenizer):
    ``[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST]``."""
    if system:
        user = f"{B_SYS}{system.strip()}{E_SYS}{user.strip()}"
    return f"{B_INST} {user.strip()} {E_INST}"


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


def _gathered_last(model: Transformer, logits: torch.Tensor) -> torch.Tensor:
    """The last position's logits over the true vocabulary, gathered from all TP ranks."""
    last = mappings.gather_from_tp(logits[:, -1].contiguous(), model.tp.group)
    return last[..., : model.cfg.vocab_size]


def check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, cfg: ModelConfig) -> None:
    """Raise GenerationError for empty prompts, out-of-vocabulary ids or a context overflow."""
    if not prompts:
        raise GenerationError("no prompts")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens={max_new_tokens} must be >= 1")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty (no tokens)")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise GenerationError(f"prompt {i}: token id {bad[0]} outside the model's vocabulary "
                                  f"[0, {cfg.vocab_size}) -- tokenizer/model mismatch?")
        if len(p) + max_new_tokens > cfg.max_seq_len:
            raise GenerationError(f"prompt {i}: {len(p)} tokens + {max_new_tokens} new tokens "
                                  f"exceed the model's context of {cfg.max_seq_len}")


@torch.no_grad()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: Sampling = Sampling(), eos_id: int | None = None, use_cache: bool = True,
             on_step: Callable[[torch.Tensor], None] | None = None) -> list[list[int]]:
    """New tokens for each prompt (token ids), stopping at ``eos_id`` (not included) or after
    ``max_new_tokens``. Collective over the model's TP group; every rank returns the same lists.

    ``use_cache=False`` recomputes the whole (padded) sequence at every step -- the reference the
    cached path must equal. ``on_step`` sees each step's chosen tokens [b] (for streaming).
    """
    check_prompts(prompts, max_new_tokens, model.cfg)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    bsz, longest = len(prompts), max(len(p) for p in prompts)
    total = longest + max_new_tokens
    tokens = torch.zeros(bsz, total, dtype=torch.long, device=device)  # pad id 0: never attended
    real = torch.zeros(bsz, total, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):longest] = torch.tensor(list(p), dtype=torch.long)
        real[i, longest - len(p):] = True
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    # a query sees earlier real tokens, and itself (so pad rows are never fully masked: no NaN)
    mask = (causal & real[:, None, :]) | torch.eye(total, dtype=torch.bool, device=device)
    mask = mask[:, None]  # [b, 1, query, key]
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.temperature > 0 else None
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    out = torch.zeros(bsz, max_new_tokens, dtype=torch.long, device=device)
    cache = KVCache(model.cfg, model.tp, bsz, total, device, dtype) if use_cache else None
    start, n_out = 0, 0
    for step in range(max_new_tokens):
        end = longest + step
        if cache is None:  # recompute everything so far in a throwaway cache
            step_cache = KVCache(model.cfg, model.tp, bsz, end, device, dtype)
            start = 0
        else:
            step_cache = cache
        step_cache.prepare(positions[:, start:end], mask[:, :, start:end, :end])
        logits = model(tokens[:, start:end], step_cache)
        nxt = next_token(_gathered_last(model, logits), sampling, generator)
        if eos_id is not None:
            nxt = nxt.masked_fill(done, eos_id)
        tokens[:, end] = nxt
        out[:, step] = nxt
        n_out = step + 1
        if on_step is not None:
            on_step(nxt)
        start = end
        if eos_id is not None:
            done |= nxt == eos_id
            if bool(done.all()):
                break
    result = []
    for row in out[:, :n_out].tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        result.append(row)
    return result


# ---- loading -------------------------------------------------------------------------------------
def load_from_source(model: Transformer, source: Source) -> None:
    """Copy each full tensor a reshard ``Source`` streams into this rank's shard of the model
    (vocabulary padding rows stay zero; replicated KV heads take their replica's slice)."""
    params = dict(model.named_parameters())
    seen = set()
    for name, full, where in source:
        p = params.get(name)
        if p is None:
            raise GenerationError(f"{where}: {name}: not a parameter of the model")
        dim = getattr(p, "partition_dim", None)
        tp = model.tp
        if dim is not None and tp.size > 1:
            replicas = getattr(p, "tp_replicas", 1)
            parts = tp.size // replicas
            rows = p.shape[dim] * parts
            if rows > full.shape[dim]:  # padded vocabulary
                pad_shape = list(full.shape)
                pad_shape[dim] = rows - full.shape[dim]
                full = torch.cat([full, full.new_zeros(pad_shape)], dim=dim)
            full = full.chunk(parts, dim=dim)[tp.rank // replicas]
        if tuple(full.shape) != tuple(p.shape):
            raise GenerationError(f"{where}: {name}: shape {list(full.shape)} does not fit the "
                                  f"model's {list(p.shape)}")
        with torch.no_grad():
            p.copy_(full.to(p.dtype))
        seen.add(name)
    missing = sorted(set(params) - seen)
    if missing:
        raise GenerationError(f"{missing[0]}: not in the checkpoint ({len(missing)} missing)")


def resolve_model(fmt: str, path: Path) -> tuple[ModelConfig, Path | None, Path | Source]:
    """(model config, default tokenizer path or None, a loader token) for --checkpoint/--format.

    Everything here runs before torch.distributed starts, so bad paths fail fast on every rank.
    """
    if fmt == "megallama":
        from megallama.checkpoint.weights import read_index
        from megallama.evaluate import resolve_checkpoint

        step_dir, run_config = resolve_checkpoint(path)
        cfg = ModelConfig(**read_index(step_dir)["model_config"])
        tokenizer = None
        if run_config is not None:
            from megallama.config.compose import load_saved_config

            saved = load_saved_config(run_config).data.tokenizer
            tokenizer = Path(saved) if saved else None
        return cfg, tokenizer, step_dir
    from megallama.checkpoint.convert import open_source

    source = open_source(fmt, path)
    tok = path / "tokenizer.model"
    if not tok.is_file() and (path.parent / "tokenizer.model").is_file():  # Meta's layout
        tok = path.parent / "tokenizer.model"
    return source.config, tok if tok.is_file() else None, source


def build_model(cfg: ModelConfig, fmt: str, loader: Path | Source, tp: TensorParallel,
                device: torch.device, dtype: torch.dtype) -> Transformer:
    """The model at this TP layout with the checkpoint's weights, in eval mode."""
    model = Transformer(cfg, tp)
    if fmt == "megallama":
        from megallama.checkpoint.weights import load_model_weights

        assert isinstance(loader, Path)
        load_model_weights(model.named_layers(), tp, loader, cfg)
    else:
        assert not isinstance(loader, Path)
        load_from_source(model, loader)
    return model.to(device=device, dtype=dtype).eval()


# ---- command line --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megallama-generate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="megallama step/checkpoints/run directory, or a Meta/HF dir with --format")
    p.add_argument("--format", default="megallama", choices=["megallama", "meta", "hf"])
    p.add_argument("--tokenizer", help="tokenizer.model (default: the run's / the directory's)")
    p.add_argument("--prompt", action="append", default=[], help="repeat for a batch")
    p.add_argument("--prompt-file", help="one prompt per line")
    p.add_argument("--chat", action="store_true", help="wrap prompts in Llama-2-chat [INST] format")
    p.add_argument("--system", help="system prompt for --chat (<<SYS>> block)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the sequence every step")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-stream", action="store_true", help="print completions only at the end")
    return p


def _world() -> tuple[int, int]:
    from megallama.parallel.runtime import world_info

    return world_info()


def _init_tp(cfg: ModelConfig, device: torch.device) -> TensorParallel:
    """Plain torch.distributed (no DeepSpeed needed) with tp = world size, pp = 1."""
    _, world = _world()
    if world == 1:
        return TensorParallel()
    from megallama.parallel.topology import Grid, build_topology, kv_replicas_for

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    topo = build_topology(Grid(tp=world, dp=1), kv_replicas_for(cfg.n_kv_heads, world))
    return topo.tensor_parallel(cfg.n_kv_heads)


class _Streamer:
    """Prints one sequence's text as it grows. It decodes prompt and continuation together and
    prints what is new, because SentencePiece drops the leading space of a first piece decoded
    alone and byte pieces only become a character once all of them are there."""

    def __init__(self, tokenizer, prompt: list[int], eos_id: int) -> None:
        self.tokenizer, self.eos_id = tokenizer, eos_id
        self.ids = list(prompt)
        self.printed = tokenizer.decode(self.ids)
        self.stopped = False
        sys.stdout.write(self.printed)
        sys.stdout.flush()

    def __call__(self, nxt: torch.Tensor) -> None:
        tok = int(nxt[0])
        if self.stopped or tok == self.eos_id:
            self.stopped = True
            return
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank, _ = _world()
    from megallama.checkpoint.atomic import CheckpointError
    from megallama.data.tokenizer import Tokenizer, TokenizerError, check_vocab
    from megallama.parallel.runtime import resolve_device

    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
        cfg, default_tok, loader = resolve_model(args.format, Path(args.checkpoint))
        tok_path = Path(args.tokenizer) if args.tokenizer else default_tok
        if tok_path is None:
            raise GenerationError("no tokenizer: pass --tokenizer PATH/tokenizer.model")
        tokenizer = Tokenizer(tok_path)
        check_vocab(tokenizer.vocab_size, cfg.vocab_size, tok_path)
        texts = list(args.prompt)
        if args.prompt_file:
            texts += [line.rstrip("\n") for line in Path(args.prompt_file).read_text().splitlines()
                      if line.strip()]
        if not texts:
            raise GenerationError("give at least one --prompt or --prompt-file")
        if args.chat:
            texts = [chat_prompt(t, args.system) for t in texts]
        prompts = [tokenizer.encode(t, bos=True) if t.strip() else [] for t in texts]
        check_prompts(prompts, args.max_new_tokens, cfg)
        check_tp_layout(cfg, _world()[1])  # tp = world size
        device = resolve_device(args.device)
    except (ConfigError, CheckpointError, TokenizerError, GenerationError, OSError) as e:
        if rank == 0:
            print(f"megallama.generate: error: {e}", file=sys.stderr)
        return 2
    tp = _init_tp(cfg, device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = build_model(cfg, args.format, loader, tp, device, dtype)
    stream = rank == 0 and len(prompts) == 1 and not args.no_stream
    streamer = _Streamer(tokenizer, prompts[0], tokenizer.eos_id) if stream else None
    t0 = time.perf_counter()
    outs = generate(model, prompts, args.max_new_tokens, sampling, tokenizer.eos_id,
                    use_cache=not args.no_cache, on_step=streamer)
    elapsed = time.perf_counter() - t0
    if rank == 0:
        if stream:
            print(flush=True)
        else:
            for prompt, ids in zip(prompts, outs, strict=True):
                print(f"{tokenizer.decode(prompt + ids)}\n", flush=True)
        n = sum(len(o) for o in outs)
        print(f"[{n} tokens in {elapsed:.2f} s, {n / max(elapsed, 1e-9):.1f} tokens/s]",
              file=sys.stderr, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
