"""The one inference loader: this rank's pipeline stage of a Llama model, with its weights, and
nothing a trainer would add (no optimizer, no gradients, no DeepSpeed).

:func:`load_for_inference` reads a megallama checkpoint of any saved layout, or a Meta / Hugging
Face directory, into any (tp, pp) layout (dp = world / (tp * pp) replicas of the pipeline). Each
rank builds only its stage's layers -- cut by :func:`megallama.model.layout.stage_cuts`, so the
stages are those training uses -- and reads only their tensors. Layers are built on the meta
device and given empty storage in the target dtype and device before the weights are copied in,
so no random initialisation runs and no fp32 copy of a bf16 model is ever made.

:class:`InferenceModel` runs the forward through the pipeline: the first stage embeds the
tokens, every stage runs its blocks and sends the hidden state on (:mod:`.stages`), the last
stage returns vocab-parallel logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from megallama.checkpoint.atomic import CheckpointError, agree
from megallama.checkpoint.lookup import find_checkpoint, find_tokenizer, run_config_of
from megallama.checkpoint.weights import load_model_weights, read_index
from megallama.config import ConfigError, ModelConfig, check_tp_layout, kv_replicas_for
from megallama.config.grid import Grid
from megallama.data.tokenizer import Tokenizer, TokenizerError
from megallama.inference.stages import (
    StageKVCache,
    broadcast_from_last,
    recv_from_previous,
    send_to_next,
)
from megallama.interop.convert import open_source
from megallama.interop.hf import HFSource
from megallama.interop.names import hf_to_meta_name
from megallama.model import layout
from megallama.model.llama import Transformer, TransformerBlock, layer_defs
from megallama.model.tied import embedding_copy
from megallama.parallel.layers import TensorParallel
from megallama.parallel.runtime import init_distributed, resolve_device, world_info
from megallama.parallel.topology import Topology, build_topology

if TYPE_CHECKING:
    from megallama.interop.convert import Source

FORMATS = ("megallama", "meta", "hf")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint is, found without building a model or starting torch.distributed."""

    path: Path  # the step directory (megallama) or the Meta / HF directory
    fmt: str
    cfg: ModelConfig
    tokenizer: Path | None  # found beside the weights or through the run's config
    run_config: Path | None  # the run's config.yaml (megallama step directories in a run)


def inspect_checkpoint(path: Path, fmt: str = "megallama") -> CheckpointInfo:
    """Resolve ``path`` (a step/checkpoints/run directory, or a Meta / HF directory with ``fmt``)
    and read its model config. Raises CheckpointError / ConfigError with one line."""
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    path = Path(path)
    if fmt == "megallama":
        step = find_checkpoint(path)
        try:
            cfg = ModelConfig(**read_index(step)["model_config"])
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{step}: model_config: {e}") from None
        return CheckpointInfo(step, fmt, cfg, find_tokenizer(step), run_config_of(step))
    source = open_source(fmt, path)  # validates the key set and shapes (headers only)
    return CheckpointInfo(path, fmt, source.config, find_tokenizer(path), None)


# ---- checks before loading: every rank finds the same, before torch.distributed starts --------
def inference_device(name: str) -> torch.device:
    """``--device`` (auto, cpu or cuda) as a torch device; cuda without a GPU is a ConfigError
    naming the option (not the trainer's ``trainer.device``)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu (or auto)")
    try:
        return resolve_device(name)
    except ConfigError:
        raise ConfigError(f"--device {name}: expected auto, cpu or cuda") from None


def check_layout(cfg: ModelConfig, tp: int, pp: int, world: int, *, exact: bool = False,
                 seq_len: int | None = None, partition_method: str = "balanced",
                 names: tuple[str, str] = ("--tp ", "--pp ")) -> Grid:
    """The (tp, pp, dp) grid of ``world`` ranks, or a ConfigError naming ``--tp`` / ``--pp``
    (``names``: how the options are spelled before their value, e.g. ``("tp=", "pp=")`` for
    lm-eval's ``--model_args``).

    The model's own limits are checked first (tp must split the heads and the FFN, every stage
    needs a block), so a single process told ``--tp 3`` hears about the heads, not the world.
    ``exact``: tp * pp must be the world (generation has no data parallelism)."""
    t, p = names
    tpo, ppo = t.strip(" ="), p.strip(" =")  # the option without its value: "--tp", "tp"
    if tp < 1 or pp < 1:
        raise ConfigError(f"{t}{tp} {p}{pp}: both must be >= 1")
    try:
        check_tp_layout(cfg, tp)
    except ConfigError as e:
        raise ConfigError(f"{str(e).replace(f'parallel.tp={tp}', f'{t}{tp}')}; choose "
                          f"another {tpo}") from None
    if pp > cfg.n_layers:
        raise ConfigError(f"{p}{pp}: more pipeline stages than the model's n_layers="
                          f"{cfg.n_layers} blocks; choose 1 <= {ppo} <= {cfg.n_layers}")
    layout.stage_cuts(cfg, pp, seq_len, partition_method)  # a known partition method
    if world % (tp * pp) or (exact and tp * pp != world):
        need = "equal" if exact else "divide"
        raise ConfigError(f"{t}{tp} * {p}{pp} = {tp * pp} does not {need} the world size "
                          f"{world}; launch {'' if exact else 'a multiple of '}tp*pp ranks "
                          f"(torchrun --nproc-per-node {tp * pp if exact else 'N'}) or change "
                          f"{tpo} / {ppo}")
    return Grid.from_world(world, tp=tp, pp=pp)


def open_tokenizer(path: Path, explicit: bool = True) -> Tokenizer:
    """The SentencePiece model at ``path``, or a TokenizerError that says where it came from:
    ``--tokenizer`` (``explicit``) or found beside the checkpoint / in the run's config."""
    where = "--tokenizer" if explicit else "the tokenizer found with the checkpoint"
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "no such file"
        raise TokenizerError(f"{where} {path}: {kind}; pass --tokenizer PATH/tokenizer.model")
    try:
        return Tokenizer(path)
    except TokenizerError as e:  # its message names the file and what to give instead
        raise TokenizerError(f"{where}: {e}") from None


class InferenceModel(nn.Module):
    """One rank's pipeline stage of a Llama model, for evaluation and generation.

    ``layers`` are (global name, module) in forward order (a contiguous piece of
    ``layout.layer_names``); ``topo`` is the rank grid (None for a single-stage model built
    outside :func:`load_for_inference`, see :func:`as_inference_model`). ``tokenizer`` is the
    tokenizer found beside the weights, if any. Parameters never require gradients.
    """

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, layers: Sequence[tuple[str, nn.Module]],
                 topo: Topology | None = None, tokenizer: Path | None = None) -> None:
        super().__init__()
        self.cfg, self.tp, self.topo, self.tokenizer = cfg, tp, topo, tokenizer
        layers = list(layers)  # a trailing tok_embeddings after the head: a tied last stage's copy
        tied = len(layers) > 1 and layers[-1][0] == "tok_embeddings"
        self.tied_embedding = layers.pop()[1] if tied else None
        self.names = [name for name, _ in layers]
        self.stage = nn.ModuleList(module for _, module in layers)
        blocks = [m.layer_id for m in self.stage if isinstance(m, TransformerBlock)]
        self.first_block, self.n_blocks = (blocks[0] if blocks else 0), len(blocks)

    # ---- where this stage sits ---------------------------------------------------------------
    @property
    def is_first_stage(self) -> bool:
        return self.topo is None or self.topo.is_first_stage

    @property
    def is_last_stage(self) -> bool:
        return self.topo is None or self.topo.is_last_stage

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def named_layers(self) -> list[tuple[str, nn.Module]]:
        """(global name, module) of this stage's layers, in forward order."""
        return list(zip(self.names, self.stage, strict=True))

    def weight_layers(self) -> list[tuple[str, nn.Module]]:
        """:meth:`named_layers` and a tied last stage's copy of the embedding: what loads."""
        copy = self.tied_embedding
        return self.named_layers() + ([("tok_embeddings", copy)] if copy is not None else [])

    # ---- compute -----------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int) -> StageKVCache:
        """An empty KV cache of this stage's blocks for ``batch`` sequences of ``max_len``."""
        return StageKVCache(self.cfg, self.tp, self.first_block, self.n_blocks, batch, max_len,
                            self.device, self.dtype)

    def forward(self, tokens: torch.Tensor, cache: StageKVCache | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor | None:
        """Vocab-parallel logits [b, s, vocab/tp] of ``tokens`` [b, s] on the last stage, None on
        the others. Collective over the pipeline: every stage calls it with tokens of the same
        shape (only the first stage reads their values). With a prepared ``cache`` the tokens
        continue the cached ones (see :class:`megallama.model.llama.KVCache`). ``segments``
        [b, s] (packed documents, every stage) keeps attention and RoPE positions within each
        document, as in training."""
        b, s = tokens.shape
        h = None
        if not self.is_first_stage:
            assert self.topo is not None
            h = recv_from_previous((b, s, self.cfg.dim), self.dtype, self.device, self.topo)
        for name, module in self.named_layers():
            if name == "tok_embeddings":
                h = module(tokens.to(self.device))
            elif isinstance(module, TransformerBlock):
                h = module(h, cache) if segments is None else module(h, cache, segments)
            else:  # final norm, output head
                h = module(h)
        if cache is not None:
            cache.advance(s)
        if self.is_last_stage:
            return h
        assert self.topo is not None and h is not None
        send_to_next(h, self.topo)
        return None

    def broadcast_from_last(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as the last stage holds it, on every stage of this pipeline (in place)."""
        return t if self.topo is None else broadcast_from_last(t, self.topo)


def as_inference_model(model: Transformer) -> InferenceModel:
    """A whole single-stage :class:`Transformer` (any TP group) seen as an InferenceModel; it
    shares the Transformer's modules."""
    return InferenceModel(model.cfg, model.tp, model.named_layers())


# ---- building and loading ------------------------------------------------------------------------
def _materialise(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Give a meta-device module empty parameters of ``dtype`` on ``device`` (keeping the
    attributes checkpoint code reads, e.g. ``partition_dim``), and move its buffers (the fp32
    RoPE tables, built on the CPU) to ``device``."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            fresh = nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device),
                                 requires_grad=False)
            fresh.__dict__.update(p.__dict__)
            setattr(sub, name, fresh)
    return module.to(device)


def build_stage(cfg: ModelConfig, tp: TensorParallel, names: Sequence[str], device: torch.device,
                dtype: torch.dtype) -> list[tuple[str, nn.Module]]:
    """The layers ``names`` (global names, forward order) with uninitialised weights: on the meta
    device no random initialisation runs (it would draw every full tensor on the CPU)."""
    wanted = set(names)
    with torch.device("meta"):
        defs = layer_defs(cfg, tp)
        built = [(d.name, d.build()) for d in defs if d.name in wanted]
        copy = embedding_copy(defs, wanted)  # a tied head without its embedding: a copy, last
        built += [("tok_embeddings", copy)] if copy is not None else []
    return [(name, _materialise(module, device, dtype).eval()) for name, module in built]


def _restrict(source: Source, layers: set[str]) -> None:
    """Make ``source`` read only the tensors of ``layers``: the sources read one tensor at a time
    in the order of their ``names`` list, so a shorter list reads less from disk."""
    names = getattr(source, "names", None)
    if names is None:
        return
    to_meta = hf_to_meta_name if isinstance(source, HFSource) else str
    source.names = [n for n in names if layout.layer_of(to_meta(n)) in layers]  # type: ignore


def load_from_source(model: InferenceModel | Transformer, source: Source) -> None:
    """Copy the full tensors a reshard ``Source`` streams into this rank's slices of ``model``'s
    layers (vocabulary padding rows zero, replicated KV heads their replica's slice); tensors of
    other stages are not read. Raises CheckpointError (one line) on a misfit or missing tensor."""
    if isinstance(model, Transformer):
        model = as_inference_model(model)
    stage = set(model.names)
    params = {f"{prefix}.{local}": p for prefix, module in model.weight_layers()
              for local, p in module.named_parameters()}
    stage = stage | {name for name, _ in model.weight_layers()}
    _restrict(source, stage)
    seen = set()
    for name, full, where in source:
        if layout.layer_of(name) not in stage:
            continue
        p = params.get(name)
        if p is None:
            raise CheckpointError(f"{where}: {name}: not a parameter of the model")
        try:
            local = layout.shard_spec(model.cfg, name, model.tp.size).take(full, model.tp.rank)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{where}: {e}") from None
        if tuple(local.shape) != tuple(p.shape):
            raise CheckpointError(f"{where}: {name}: slice {list(local.shape)} does not fit the "
                                  f"model's {list(p.shape)}")
        with torch.no_grad():
            p.copy_(local.to(p.dtype))
        seen.add(name)
    missing = sorted(set(params) - seen)
    if missing:
        raise CheckpointError(f"{missing[0]}: not in the checkpoint ({len(missing)} missing)")


def _load_source_everywhere(model: InferenceModel, fmt: str, path: Path) -> None:
    """:func:`load_from_source` on every rank; if one fails, all raise (no rank goes on to wait
    for activations that never come)."""
    error = None
    try:
        load_from_source(model, open_source(fmt, path))
    except Exception as e:  # reported to rank 0 so that every rank raises
        error = e
    failures = agree(None if error is None else f"{type(error).__name__}: {error}",
                     lambda outcomes: [(r, m) for r, m in enumerate(outcomes) if m])
    if error is not None:
        raise error
    if failures:
        raise CheckpointError(f"loading {path}: rank {failures[0][0]}: {failures[0][1]}")


def rank_topology(cfg: ModelConfig, tp: int, pp: int, device: torch.device) -> Topology:
    """Start torch.distributed if the world has several ranks (plain torch.distributed, no
    DeepSpeed) and build the (tp, pp, dp = world / (tp * pp)) grid's groups. Collective."""
    world = dist.get_world_size() if dist.is_initialized() else world_info()[1]
    grid = Grid.from_world(world, tp=tp, pp=pp)
    if world > 1:
        init_distributed(device)
    return build_topology(grid, kv_replicas_for(cfg.n_kv_heads, tp))


def load_for_inference(checkpoint: Path, fmt: str = "megallama", *, tp: int = 1, pp: int = 1,
                       dtype: torch.dtype = torch.float32,
                       device: torch.device = torch.device("cpu"),  # noqa: B008 (immutable)
                       topo: Topology | None = None, seq_len: int | None = None,
                       partition_method: str = "balanced") -> InferenceModel:
    """This rank's stage of the model in ``checkpoint`` at (tp, pp), in eval mode. Collective.

    ``checkpoint``: a megallama step / checkpoints / run directory, or with ``fmt`` "meta" or
    "hf" such a directory. ``topo``: an existing grid (its tp/pp win; it must match tp*pp*dp =
    world), else torch.distributed is started when needed and a grid built. ``seq_len`` and
    ``partition_method`` choose the stage cuts as training does (they never change results).
    """
    info = inspect_checkpoint(Path(checkpoint), fmt)
    cfg = info.cfg
    if topo is None:
        topo = rank_topology(cfg, tp, pp, device)
    grid = topo.grid
    tpc = topo.tensor_parallel(cfg.n_kv_heads)
    cuts = layout.stage_cuts(cfg, grid.pp, seq_len, partition_method)
    names = layout.layer_names(cfg)[cuts[topo.pp_rank]:cuts[topo.pp_rank + 1]]
    model = InferenceModel(cfg, tpc, build_stage(cfg, tpc, names, device, dtype), topo,
                           info.tokenizer)
    if fmt == "megallama":
        load_model_weights(model.weight_layers(), tpc, info.path, cfg)
    else:
        _load_source_everywhere(model, fmt, info.path)
    return model.eval()


__all__ = ["FORMATS", "PRECISIONS", "CheckpointInfo", "InferenceModel", "as_inference_model",
           "build_stage", "check_layout", "inference_device", "inspect_checkpoint",
           "load_for_inference", "load_from_source", "open_tokenizer", "rank_topology"]
