"""The model's layout as pure functions of its config: the ordered layer list, where pipeline
stages cut it, and where every TP slice of every parameter lives.

One module answers these questions for the model builder, the pipeline engine, the checkpoint
writer and reader, the resharder and the planner, so none of them can disagree with the trainer.
Nothing here builds a layer or touches torch.distributed (and DeepSpeed is never imported): the
planner and the resharder lay out a 70B model on a laptop.

Layers: embedding, ``n_layers`` transformer blocks, final norm, output head (Meta's names). With
``tie_embeddings`` the head has no parameter: ``output.weight`` is not a tensor of the model (the
head multiplies by ``tok_embeddings.weight``), so it is neither sharded nor saved. At pp > 1 the
last stage holds a copy of ``tok_embeddings.weight`` (the same TP slices), loaded under that name
and never saved; the engine keeps the two copies equal (Megatron's embedding group).

Stages: ``balanced`` weighs each layer by its forward FLOPs per token (the head's vocabulary
matmul and loss included; the embedding lookup costs memory but almost no compute, so it gets a
small weight); ``uniform`` weighs every layer 1. Either way the cuts minimise the costliest stage
with every stage holding at least one transformer block. That rule is not cosmetic: every stage
then has both matrices (weight decay) and norm weights (no decay), so every rank's optimizer has
the same two parameter groups, which DeepSpeed's ZeRO requires.

Slices: a split parameter is cut into ``tp // replicas`` equal slices along its split dimension;
the vocabulary (dim 0 of the embedding and the head) is first padded with zero rows to a multiple
of tp, and when tp > n_kv_heads each KV slice is held by ``replicas`` consecutive TP ranks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from megallama.config import ConfigError, ModelConfig, check_tp_layout, kv_replicas_for
from megallama.config.validate import PARTITION_METHODS
from megallama.parallel.layers import padded_vocab_size

# Tensors whose dim 0 is the vocabulary, padded in the model to a multiple of tp (never stored).
VOCAB_PADDED = frozenset({"tok_embeddings.weight", "output.weight"})
_BLOCK = re.compile(r"layers\.(0|[1-9]\d*)\.(.+)")


# ---- layers --------------------------------------------------------------------------------------
def layer_names(cfg: ModelConfig) -> list[str]:
    """The model's ordered layer list: ``["tok_embeddings", "layers.0", ..., "norm", "output"]``."""
    return ["tok_embeddings", *(f"layers.{i}" for i in range(cfg.n_layers)), "norm", "output"]


def is_block(name: str) -> bool:
    """Whether layer ``name`` is a transformer block (the layers a pipeline stage must have)."""
    return name.startswith("layers.")


def layer_of(param_name: str) -> str:
    """The layer a parameter belongs to: ``"layers.3.attention.wq.weight"`` -> ``"layers.3"``,
    ``"output.weight"`` -> ``"output"``."""
    parts = param_name.split(".")
    return ".".join(parts[:2]) if is_block(param_name) else parts[0]


# ---- pipeline stages -----------------------------------------------------------------------------
def layer_costs(cfg: ModelConfig, seq_len: int) -> list[int]:
    """Relative forward cost per token of each layer of :func:`layer_names` (integers)."""
    d, hd, f = cfg.dim, cfg.head_dim, cfg.ffn_hidden_dim
    block = 2 * (2 * d * cfg.n_heads * hd + 2 * d * cfg.n_kv_heads * hd + 3 * d * f)
    block += 4 * seq_len * cfg.n_heads * hd // 2  # causal attention scores and values
    head = 2 * d * cfg.vocab_size + 5 * cfg.vocab_size  # matmul + softmax/loss
    cost = {"tok_embeddings": max(1, block // 50), "norm": max(1, block // 100), "output": head}
    return [cost.get(n, block) for n in layer_names(cfg)]


def balanced_cuts(costs: list[int], is_block: list[bool], stages: int) -> list[int]:
    """Stage boundaries [0, ..., len(costs)] minimising the largest stage cost, each stage holding
    at least one block (dynamic programming over contiguous splits). Raises ConfigError (a
    ValueError) when there are fewer blocks than stages."""
    return list(_cuts(tuple(costs), tuple(bool(b) for b in is_block), stages))


@lru_cache(maxsize=1024)  # the planner asks for the same cuts once per candidate layout
def _cuts(costs: tuple[int, ...], blocks_at: tuple[bool, ...], stages: int) -> tuple[int, ...]:
    n = len(costs)
    if stages < 1 or sum(blocks_at) < stages:
        raise ConfigError(f"{stages} pipeline stages need at least {max(stages, 1)} blocks")
    prefix, blocks = [0], [0]
    for c, b in zip(costs, blocks_at, strict=True):
        prefix.append(prefix[-1] + c)
        blocks.append(blocks[-1] + int(b))
    inf = float("inf")
    # best[k][i]: minimal max-cost of splitting layers [0, i) into k stages
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(1, n + 1):
            for j in range(k - 1, i):
                if best[k - 1][j] == inf or blocks[i] - blocks[j] == 0:
                    continue
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    bounds = [n]
    for k in range(stages, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    return tuple(bounds[::-1])


def stage_cuts(cfg: ModelConfig, pp: int, seq_len: int | None = None,
               method: str = "balanced") -> list[int]:
    """Index in :func:`layer_names` where each of the ``pp`` stages starts, plus the end: the one
    rule for pipeline stages. ``balanced`` weighs layers by :func:`layer_costs` at ``seq_len``
    (default ``max_seq_len``), ``uniform`` weighs every layer 1."""
    if method not in PARTITION_METHODS:
        raise ConfigError(f"partition_method={method!r}: choose one of {list(PARTITION_METHODS)}")
    if not 1 <= pp <= cfg.n_layers:
        raise ConfigError(f"pp={pp}: every pipeline stage needs at least one transformer block "
                          f"and the model has n_layers={cfg.n_layers}; choose 1 <= pp <= "
                          f"{cfg.n_layers}")
    names = layer_names(cfg)
    if method == "balanced":
        costs = layer_costs(cfg, seq_len or cfg.max_seq_len)
    else:
        costs = [1] * len(names)
    return balanced_cuts(costs, [is_block(n) for n in names], pp)


def stage_of_layers(cfg: ModelConfig, pp: int, seq_len: int | None = None,
                    method: str = "balanced") -> dict[str, int]:
    """Layer name -> the pipeline stage that holds it (:func:`stage_cuts`)."""
    cuts = stage_cuts(cfg, pp, seq_len, method)
    names = layer_names(cfg)
    return {names[i]: s for s in range(pp) for i in range(cuts[s], cuts[s + 1])}


# ---- tensor-parallel slices ----------------------------------------------------------------------
@dataclass(frozen=True)
class ShardSpec:
    """Where the TP slices of one global parameter live at a given ``tp``.

    ``split_dim`` None: replicated on every TP rank. Otherwise the tensor, padded to ``padded``
    along ``split_dim`` (vocabulary padding; == the real length for other tensors), is cut into
    ``parts`` equal slices; slice ``i`` is held by the ``replicas`` TP ranks from ``i * replicas``.
    """

    name: str
    shape: tuple[int, ...]  # global, unpadded
    split_dim: int | None
    tp: int
    replicas: int
    padded: int

    @property
    def parts(self) -> int:
        """Number of distinct slices."""
        return self.tp // self.replicas

    def slice_index(self, tp_rank: int) -> int:
        """Which slice TP rank ``tp_rank`` holds."""
        return tp_rank // self.replicas

    def is_first_holder(self, tp_rank: int) -> bool:
        """Whether ``tp_rank`` stores its slice in a checkpoint: the first replica of a split
        slice, TP rank 0 for a replicated tensor (so each element is stored once)."""
        return tp_rank == 0 if self.split_dim is None else tp_rank % self.replicas == 0

    def piece(self, tp_rank: int) -> tuple[int, int]:
        """(offset, length) along ``split_dim`` of the real (unpadded) rows ``tp_rank`` holds;
        length 0 when its slice is all vocabulary padding. (0, shape[0]) when replicated."""
        if self.split_dim is None:
            return 0, self.shape[0]
        local = self.padded // self.parts
        offset = self.slice_index(tp_rank) * local
        return offset, max(0, min(local, self.shape[self.split_dim] - offset))

    def local_shape(self) -> tuple[int, ...]:
        """Shape of the (padded) slice one rank holds."""
        if self.split_dim is None:
            return self.shape
        out = list(self.shape)
        out[self.split_dim] = self.padded // self.parts
        return tuple(out)

    def take(self, full: torch.Tensor, tp_rank: int) -> torch.Tensor:
        """``tp_rank``'s local slice of the full unpadded tensor, padding rows zero (a view of
        ``full`` when no padding is involved)."""
        if tuple(full.shape) != self.shape:
            raise ValueError(f"{self.name}: shape {list(full.shape)}, expected {list(self.shape)}")
        if self.split_dim is None:
            return full
        dim, (offset, length) = self.split_dim, self.piece(tp_rank)
        local = self.local_shape()
        if length == local[dim]:
            return full.narrow(dim, offset, length)
        pad = full.new_zeros(local)
        pad.narrow(dim, 0, length).copy_(full.narrow(dim, min(offset, self.shape[dim]), length))
        return pad


_PROBE = ModelConfig(dim=8, n_layers=1, n_heads=2, vocab_size=8)  # split dims do not depend on it


def _block_params(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], int | None]]:
    """(shape, split dim) of a block's parameters, in registration order: column-parallel
    projections split their output rows (dim 0), row-parallel ones their input columns (dim 1)."""
    d, f, hd = cfg.dim, cfg.ffn_hidden_dim, cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    return {
        "attention.wq.weight": ((q, d), 0),
        "attention.wk.weight": ((kv, d), 0),
        "attention.wv.weight": ((kv, d), 0),
        "attention.wo.weight": ((d, q), 1),
        "feed_forward.w1.weight": ((f, d), 0),
        "feed_forward.w2.weight": ((d, f), 1),
        "feed_forward.w3.weight": ((f, d), 0),
        "attention_norm.weight": ((d,), None),
        "ffn_norm.weight": ((d,), None),
    }


def _top_params(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], int | None]]:
    """(shape, split dim) of the embedding, final norm and head (the two tables are split along
    the vocabulary)."""
    top = {"tok_embeddings.weight": ((cfg.vocab_size, cfg.dim), 0),
           "norm.weight": ((cfg.dim,), None),
           "output.weight": ((cfg.vocab_size, cfg.dim), 0)}
    if cfg.tie_embeddings:
        del top["output.weight"]
    return top


def _spec(cfg: ModelConfig, name: str, tp: int, shape: tuple[int, ...],
          dim: int | None) -> ShardSpec:
    kv = name.endswith(("attention.wk.weight", "attention.wv.weight"))
    replicas = kv_replicas_for(cfg.n_kv_heads, tp) if kv else 1
    if dim is None:
        padded = shape[0]
    elif name in VOCAB_PADDED:
        padded = padded_vocab_size(shape[0], tp)
    else:
        padded = shape[dim]
    spec = ShardSpec(name, shape, dim, tp, replicas, padded)
    if dim is not None and (tp % replicas or padded % spec.parts):
        raise ConfigError(f"{name}: {padded} rows along dim {dim} cannot be cut into "
                          f"{spec.parts} slices at tp={tp}")
    return spec


def _check_tp(cfg: ModelConfig, tp: int) -> None:
    if tp < 1:
        raise ConfigError(f"tp={tp}: must be >= 1")
    check_tp_layout(cfg, tp)


def shard_spec(cfg: ModelConfig, name: str, tp: int) -> ShardSpec:
    """The :class:`ShardSpec` of parameter ``name`` (Meta's name) at ``tp``. Raises ConfigError
    when tp cannot split the model, KeyError when ``name`` is not a parameter of it."""
    _check_tp(cfg, tp)
    top = _top_params(cfg)
    if name in top:
        return _spec(cfg, name, tp, *top[name])
    m = _BLOCK.fullmatch(name)
    block = _block_params(cfg)
    if m is None or int(m.group(1)) >= cfg.n_layers or m.group(2) not in block:
        raise KeyError(f"{name}: not a parameter of this model")
    return _spec(cfg, name, tp, *block[m.group(2)])


def tp_split_dim(name: str) -> int | None:
    """The dimension tensor parallelism splits parameter ``name`` along (the same at every tp and
    for every config), or None for a replicated one (norms)."""
    local = _BLOCK.fullmatch(name)
    table = _block_params(_PROBE) if local else _top_params(_PROBE)
    key = local.group(2) if local else name
    if key not in table:
        raise KeyError(f"{name}: not a Llama parameter name")
    return table[key][1]


def shard_specs(cfg: ModelConfig, tp: int) -> list[ShardSpec]:
    """Every parameter's :class:`ShardSpec` at ``tp``, in model (forward, registration) order."""
    _check_tp(cfg, tp)
    top, block = _top_params(cfg), _block_params(cfg)
    out = [_spec(cfg, "tok_embeddings.weight", tp, *top["tok_embeddings.weight"])]
    for i in range(cfg.n_layers):
        out += [_spec(cfg, f"layers.{i}.{local}", tp, *rule) for local, rule in block.items()]
    return out + [_spec(cfg, n, tp, *top[n]) for n in ("norm.weight", "output.weight") if n in top]


__all__ = ["VOCAB_PADDED", "ShardSpec", "balanced_cuts", "is_block",
           "layer_costs", "layer_names", "layer_of", "shard_spec", "shard_specs", "stage_cuts",
           "stage_of_layers", "tp_split_dim"]
