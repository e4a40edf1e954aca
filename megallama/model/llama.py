"""Llama 2 on tensor-parallel layers. Reads like Meta's reference model.py, with the same
parameter names (tok_embeddings, layers.N.attention.wq, feed_forward.w1, ...), so Meta checkpoints
map one-to-one and only HF needs a name table and the q/k permutation.

RoPE is Meta's interleaved form (pairs (x[2i], x[2i+1]) rotate together). The model is an ordered
list of layers -- embedding, blocks, final norm, output head, named by :mod:`megallama.model.layout`
-- which :func:`layer_defs` exposes so that pipeline stages can be cut from it without building the
layers a stage does not own. How each parameter is sliced over TP (vocabulary padding, replicated
KV heads) is also read from the layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megallama.config import ConfigError, ModelConfig, check_tp_layout, kv_replicas_for
from megallama.model.documents import cached_positions, document_attention
from megallama.model.layout import is_block, layer_names, shard_spec
from megallama.model.recompute import checkpointing_mode, recompute, swiglu
from megallama.model.rope import apply_rotary, rope_cos_sin
from megallama.model.tied import EmbeddingRef
from megallama.parallel import mappings, partial_grads
from megallama.parallel.cross_entropy import vocab_parallel_cross_entropy
from megallama.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallel,
    VocabParallelEmbedding,
)
from megallama.parallel.sequence_linears import gathered_linears


class RMSNorm(nn.Module):
    """RMS normalisation in fp32 (as Meta and HF); under sequence parallelism each rank sees part of
    the sequence, so the weight's gradient is a partial sum over the TP group: summed once per
    step by the optimizer, or in each backward when none took that job (parallel/partial_grads.py)."""

    recompute = False  # parallel.activation_checkpointing=selective (a block's norms): rerun in backward

    def __init__(self, dim: int, eps: float, tp: TensorParallel) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.sp_group = tp.group if tp.sequence_parallel else None
        partial_grads.mark(self.weight, self.sp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return recompute(self.recompute, self._forward, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return out * partial_grads.use(self.weight)


def attention_core(xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, segments: torch.Tensor | None, n_rep: int) -> torch.Tensor:
    """RoPE and causal softmax(QK^T)V (within documents when ``segments`` is given), K/V heads
    shared by the query heads inside the kernel (``enable_gqa``, no repeated copy): q [b, s,
    heads, hd] and k/v [b, s, kv_heads, hd] as wq/wk/wv wrote them -> [b, s, heads * hd]. No
    parameters: what selective recomputation reruns."""
    bsz, seqlen = xq.shape[:2]
    q = apply_rotary(xq, cos, sin).transpose(1, 2)
    xk = apply_rotary(xk, cos, sin)
    k, v = xk.transpose(1, 2), xv.transpose(1, 2)
    if segments is not None:
        out = document_attention(q, k, v, segments)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_rep > 1)
    return out.transpose(1, 2).reshape(bsz, seqlen, -1)


# Positions the per-layer RoPE table holds: 128k-context configs (Llama 3.1) would otherwise keep
# 64 MiB per layer; longer sequences compute their angles per forward (the same values).
ROPE_TABLE_MAX = 8192


class KVCache:
    """Keys and values of the tokens seen so far, for incremental decoding (generation only).

    Holds, per layer, this rank's (TP-sharded) KV heads for ``batch`` sequences of up to
    ``max_len`` tokens. Before each forward the caller sets, for the new tokens, their RoPE
    positions (per sequence, so left-padded prompts start at 0) and a boolean attention mask
    [b, 1, new, seen + new] (True = attend); the forward then appends the new keys/values.
    """

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, batch: int, max_len: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        kv_heads = max(1, cfg.n_kv_heads // tp.size)
        shape = (cfg.n_layers, batch, max_len, kv_heads, cfg.head_dim)
        self.cfg, self.max_len = cfg, max_len
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.mask: torch.Tensor | None = None
        self.cos = self.sin = torch.empty(0)

    def prepare(self, positions: torch.Tensor, mask: torch.Tensor) -> None:
        """Set the positions [b, s] and mask [b, 1, s, length + s] of the next s tokens."""
        n = positions.shape[1]
        if self.length + n > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {n} tokens > {self.max_len}")
        if mask.shape[-1] != self.length + n:
            raise ValueError(f"mask covers {mask.shape[-1]} keys, expected {self.length + n}")
        # one table for all layers; its length is what the no-cache forward would use
        cos, sin = rope_cos_sin(self.cfg, self.length + n, positions.device)
        self.cos, self.sin, self.mask = cos[positions], sin[positions], mask

    def update(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new k/v [b, s, heads, hd]; return all keys/values so far."""
        end = self.length + k.shape[1]
        self.k[layer_id, :, self.length:end] = k
        self.v[layer_id, :, self.length:end] = v
        return self.k[layer_id, :, :end], self.v[layer_id, :, :end]

    def advance(self, n: int) -> None:
        """Mark the n tokens of the last forward as cached."""
        self.length += n


class Attention(nn.Module):
    recompute = False  # parallel.activation_checkpointing=selective: rerun attention_core in backward

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, layer_id: int, seed: int) -> None:
        super().__init__()
        self.cfg, self.tp, self.layer_id = cfg, tp, layer_id
        self.head_dim = cfg.head_dim
        self.n_local_heads = cfg.n_heads // tp.size
        self.n_local_kv_heads = max(1, cfg.n_kv_heads // tp.size)
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        kv_replicas = kv_replicas_for(cfg.n_kv_heads, tp.size)
        if kv_replicas != tp.kv_replicas:
            raise ConfigError(f"TensorParallel.kv_group has {tp.kv_replicas} ranks, expected {kv_replicas}")
        prefix, std, hd = f"layers.{layer_id}.attention", cfg.init_std, self.head_dim
        out_std = std / math.sqrt(2 * cfg.n_layers)
        self.wq = ColumnParallelLinear(cfg.dim, cfg.n_heads * hd, tp, seed=seed, key=f"{prefix}.wq.weight", std=std)
        kv = dict(seed=seed, std=std, replicas=kv_replicas, replica_group=tp.kv_group)
        self.wk = ColumnParallelLinear(cfg.dim, cfg.n_kv_heads * hd, tp, key=f"{prefix}.wk.weight", **kv)
        self.wv = ColumnParallelLinear(cfg.dim, cfg.n_kv_heads * hd, tp, key=f"{prefix}.wv.weight", **kv)
        self.wo = RowParallelLinear(cfg.n_heads * hd, cfg.dim, tp, seed=seed, key=f"{prefix}.wo.weight", std=out_std)
        # RoPE table for positions < max_seq_len, computed once (not per forward, and not inside a
        # compiled block, where Inductor would evaluate cos/sin once per head); not in checkpoints
        cos, sin = rope_cos_sin(cfg, min(cfg.max_seq_len, ROPE_TABLE_MAX), torch.device("cpu"))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def rope(self, seqlen: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions 0..seqlen-1: a prefix of the table (the angles do not depend on
        the length up to max_seq_len), else computed (dynamic scaling, or a table cast away from
        fp32 by a whole-module dtype change)."""
        cos, sin = self.rope_cos, self.rope_sin
        if seqlen <= cos.shape[0] and cos.dtype == torch.float32 and cos.device == device:
            return cos[:seqlen], sin[:seqlen]
        return rope_cos_sin(self.cfg, seqlen, device)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """Causal self-attention over x; with ``cache`` (generation), over the cached tokens and
        x, at the cache's positions and under its mask, appending x's keys/values to it; with
        ``segments`` [b, s] (packed documents), within each document, positions restarting at
        each (:mod:`megallama.model.documents`)."""
        # one all-gather under SP; only the sequence shard is kept for backward
        xq, xk, xv = gathered_linears(x, (self.wq, self.wk, self.wv), self.tp)
        bsz, seqlen, _ = xq.shape
        xq = xq.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = xk.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = xv.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        if cache is not None:
            cos, sin = cache.cos, cache.sin
        elif segments is not None:
            cos, sin = self.rope(seqlen, x.device)
            positions = cached_positions(segments)
            cos, sin = cos[positions], sin[positions]
        else:
            cos, sin = self.rope(seqlen, x.device)
        if cache is None:  # training / evaluation: the attention core, recomputed if selective
            out = recompute(self.recompute, attention_core, xq, xk, xv, cos, sin, segments, self.n_rep)
            return self.tp.exit(self.wo(out))
        xq, xk = apply_rotary(xq, cos, sin), apply_rotary(xk, cos, sin)
        xk, xv = cache.update(self.layer_id, xk, xv)
        out = F.scaled_dot_product_attention(xq.transpose(1, 2), xk.transpose(1, 2),
                                             xv.transpose(1, 2), attn_mask=cache.mask,
                                             enable_gqa=self.n_rep > 1)
        out = out.transpose(1, 2).reshape(bsz, seqlen, -1)
        return self.tp.exit(self.wo(out))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), w1/w3 column-parallel, w2 row-parallel."""

    recompute = False  # parallel.activation_checkpointing=selective: rerun the product in backward

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, layer_id: int, seed: int) -> None:
        super().__init__()
        self.tp = tp
        prefix, std, hidden = f"layers.{layer_id}.feed_forward", cfg.init_std, cfg.ffn_hidden_dim
        self.w1 = ColumnParallelLinear(cfg.dim, hidden, tp, seed=seed, key=f"{prefix}.w1.weight", std=std)
        self.w2 = RowParallelLinear(hidden, cfg.dim, tp, seed=seed, key=f"{prefix}.w2.weight",
                                    std=std / math.sqrt(2 * cfg.n_layers))
        self.w3 = ColumnParallelLinear(cfg.dim, hidden, tp, seed=seed, key=f"{prefix}.w3.weight", std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = gathered_linears(x, (self.w1, self.w3), self.tp)  # SP: the shard is kept
        return self.tp.exit(self.w2(recompute(self.recompute, swiglu, gate, up)))


class TransformerBlock(nn.Module):
    """One Llama block. ``activation_checkpointing`` (parallel.activation_checkpointing):
    ``full`` (or true) recomputes the whole block in backward from its input, ``selective`` its
    RMSNorms, attention core and SwiGLU product (:mod:`megallama.model.recompute`), ``none`` (or false)
    keeps every activation."""

    def __init__(self, layer_id: int, cfg: ModelConfig, tp: TensorParallel, seed: int = 0,
                 activation_checkpointing: bool | str = False) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(cfg, tp, layer_id, seed)
        self.feed_forward = FeedForward(cfg, tp, layer_id, seed)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, tp)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, tp)
        self.activation_checkpointing = checkpointing_mode(activation_checkpointing)
        selective = self.activation_checkpointing == "selective"
        for part in (self.attention, self.feed_forward, self.attention_norm, self.ffn_norm):
            part.recompute = selective

    def _forward(self, x: torch.Tensor, cache: KVCache | None = None,
                 segments: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cache, segments)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        if cache is None and self.activation_checkpointing == "full" and torch.is_grad_enabled():
            return checkpoint(self._forward, x, None, segments, use_reentrant=False)
        return self._forward(x, cache, segments)


class Embedding(VocabParallelEmbedding):
    """tok_embeddings: token ids [b, s] -> hidden [b, s, dim] (a sequence chunk under SP)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, seed: int = 0,
                 ref: EmbeddingRef | None = None) -> None:
        padded = shard_spec(cfg, "tok_embeddings.weight", tp.size).padded
        super().__init__(cfg.vocab_size, padded, cfg.dim, tp,
                         seed=seed, key="tok_embeddings.weight", std=cfg.init_std,
                         padding_idx=cfg.pad_token_id)
        if ref is not None:
            ref.module = self


class FinalNorm(RMSNorm):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, seed: int = 0) -> None:
        super().__init__(cfg.dim, cfg.norm_eps, tp)


class OutputHead(ColumnParallelLinear):
    """Output projection; returns this rank's vocabulary slice of the logits, full sequence.
    Tied (``cfg.tie_embeddings``): no weight of its own; it multiplies by the embedding table of
    its stage (same vocabulary rows per TP slice, padded alike): at pp = 1 autograd sums both
    uses' gradients, at pp > 1 the engine sums the last stage's copy's with the first's."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, seed: int = 0,
                 ref: EmbeddingRef | None = None) -> None:
        self.tied = ref if cfg.tie_embeddings else None
        if self.tied is not None:
            nn.Module.__init__(self)
            self.replica_group, self.fp8_matmul = None, None
        else:
            padded = shard_spec(cfg, "output.weight", tp.size).padded
            super().__init__(cfg.dim, cfg.vocab_size, tp, seed=seed, key="output.weight",
                             std=cfg.init_std, pad_rows_to=padded)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tp.enter(x)
        if self.tied is None:
            return super().forward(x)
        if self.tied.module is None:
            raise ConfigError("tie_embeddings: the output head's stage has no embedding")
        return F.linear(x, self.tied.module.weight)


@dataclass
class LayerDef:
    """One entry of the model's ordered layer list: its checkpoint name prefix and how to build it."""

    name: str
    cls: type[nn.Module]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        return self.cls(*self.args, **self.kwargs)


def layer_defs(cfg: ModelConfig, tp: TensorParallel, seed: int = 0,
               activation_checkpointing: bool | str = False) -> list[LayerDef]:
    """One :class:`LayerDef` per name of ``layout.layer_names`` (embedding, n_layers blocks,
    final norm, output head), in forward order."""
    check_tp_layout(cfg, tp.size)
    top = {"tok_embeddings": Embedding, "norm": FinalNorm, "output": OutputHead}
    ckpt = activation_checkpointing
    tied = {"ref": EmbeddingRef()} if cfg.tie_embeddings else {}
    return [LayerDef(n, TransformerBlock, (int(n.split(".")[1]), cfg, tp, seed, ckpt))
            if is_block(n) else
            LayerDef(n, top[n], (cfg, tp, seed), tied if n != "norm" else {})
            for n in layer_names(cfg)]


class Transformer(nn.Module):
    """The whole model on one pipeline stage; ``forward`` returns vocab-parallel logits."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None = None, seed: int = 0,
                 activation_checkpointing: bool | str = False) -> None:
        super().__init__()
        self.cfg, self.tp = cfg, tp or TensorParallel()
        defs = layer_defs(cfg, self.tp, seed, activation_checkpointing)
        built = {d.name: d.build() for d in defs}
        # registration order is model order (state dicts, checkpoints, optimizer groups follow it)
        self.tok_embeddings = built.pop("tok_embeddings")
        self.layers = nn.ModuleList(m for n, m in built.items() if is_block(n))
        self.norm = built["norm"]
        self.output = built["output"]

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """Vocab-parallel logits of ``tokens``; with a prepared ``cache``, tokens continue the
        cached ones (see :class:`KVCache`) and are appended to it; with ``segments`` [b, s],
        attention stays within each packed document (see :mod:`megallama.model.documents`)."""
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cache, segments)
        logits = self.output(self.norm(h))
        if cache is not None:
            cache.advance(tokens.shape[1])
        return logits

    def named_layers(self) -> list[tuple[str, nn.Module]]:
        """(global name prefix, module) in forward order -- the same list pipeline stages cut."""
        return [(name, self.get_submodule(name)) for name in layer_names(self.cfg)]

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, labels, self.tp.group, self.cfg.vocab_size)

    def full_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits over the true vocabulary, gathered from all TP ranks (for evaluation/tests)."""
        logits = mappings.gather_from_tp(self(tokens), self.tp.group)
        return logits[..., : self.cfg.vocab_size]


def compile_blocks(module: nn.Module, **options: Any) -> nn.Module:
    """Optional fast path: ``torch.compile`` each transformer block in place (the blocks share one
    compiled graph). Inductor fuses the fp32 RMSNorm, RoPE and SwiGLU element-wise work into a few
    kernels and keeps fewer activations for backward; the arithmetic is the same as eager. At
    tp > 1 a block still traces whole: its TP/SP collectives are traceable inside compiled
    regions (:mod:`megallama.parallel.mappings`). ``options`` go to ``torch.compile`` (tests pick
    a backend)."""
    for block in module.modules():
        if isinstance(block, TransformerBlock):
            block.compile(**options)
    return module


class TokenLoss:
    """The loss as a callable(logits, labels) -- what DeepSpeed's PipelineModule expects: the
    vocab-parallel cross-entropy of one micro-batch. With ``denominator`` unset it is the mean over
    the micro-batch's target tokens; the engine sets it to (target tokens of the global batch) /
    (micro-batches of the global batch) for each step, so that DeepSpeed's mean over micro-batches
    and DP ranks becomes the mean over every target token of the global batch.
    ``compiled`` fuses the per-chunk math with torch.compile (with ``compile_blocks``)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, compiled: bool = False) -> None:
        self.cfg, self.tp, self.compiled = cfg, tp, compiled
        self.denominator: float | None = None

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, labels, self.tp.group, self.cfg.vocab_size,
                                            compiled=self.compiled, denominator=self.denominator)


def make_loss_fn(cfg: ModelConfig, tp: TensorParallel, compiled: bool = False) -> TokenLoss:
    """The training loss of this model (see :class:`TokenLoss`)."""
    return TokenLoss(cfg, tp, compiled)
