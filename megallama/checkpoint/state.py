"""Training state beside the weights: fp32 master weights and Adam moments, RNG, sampler, step.

The optimizer state is stored in a layout-independent format: for each of ``fp32`` (master
weights), ``exp_avg`` and ``exp_avg_sq`` a sub-directory holds safetensors shards and an index
keyed by the parameters' global names. DeepSpeed's and the fused optimizer's state is written in
the weights' format, one full parameter at a time through :class:`OptimizerStateAccess` (the
engine assembles ZeRO partitions over DP behind it); the distributed optimizer
(``optim.impl=distributed``) writes, on every rank, the pieces of state it owns and nothing else
(:mod:`megallama.checkpoint.optim_pieces`: boxes of the global tensors, no gather). Either is read
by every optimizer at any (tp, pp, dp): a checkpoint saved at one layout resumes at any other.

Directory of one step::

    step_00000100/
      model.index.json, model-ppXX-tpYY.safetensors   model weights (training dtype)
      optim/{fp32,exp_avg,exp_avg_sq}/...              same format, fp32 (or pieces.index.json
                                                       + optim-ppXX-tpYY-dpZZ.safetensors)
      trainer_state.json                               step, sampler, scheduler, Adam step, layout
      rng/rank00000.json ...                           RNG states of every rank
      config.yaml                                      the resolved run config
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from megallama.checkpoint.atomic import (
    CheckpointError,
    InvalidStateError,
    agree,
    all_or_none,
    read_json_object,
    write_text_atomic,
)
from megallama.checkpoint.optim_pieces import (
    load_from_pieces,
    load_owned_state,
    save_owned_state,
)
from megallama.checkpoint.pieces_index import INDEX_NAME as PIECES_INDEX
from megallama.checkpoint.pieces_index import check_piece_files, has_pieces, read_pieces_index
from megallama.checkpoint.weights import (
    INDEX_NAME,
    check_tensor_set,
    check_weights,
    load_model_weights,
    read_index,
    save_model_weights,
)
from megallama.config import ModelConfig
from megallama.parallel.layers import TensorParallel
from megallama.parallel.topology import Topology

OPTIM_KEYS = ("fp32", "exp_avg", "exp_avg_sq")
STATE_NAME = "trainer_state.json"
STATE_KEYS = ("step", "skipped_steps", "adam_step", "scheduler", "sampler", "layout")
Layers = list[tuple[str, nn.Module]]


class TensorSet:
    """Stands in for a module in the weights writer/reader: named tensors with a parameter's TP
    attributes, e.g. the Adam moments of that module's parameters."""

    def __init__(self, items: list[tuple[str, nn.Parameter]]) -> None:
        self.items = items

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(self.items)


def _like(p: nn.Parameter, value: torch.Tensor) -> nn.Parameter:
    view = nn.Parameter(value, requires_grad=False)
    for attr in ("partition_dim", "tp_replicas", "tied_copy"):
        if hasattr(p, attr):
            setattr(view, attr, getattr(p, attr))
    return view


def _full_shape(p: nn.Parameter) -> torch.Size:
    return getattr(p, "ds_shape", p.shape)  # ZeRO-3 keeps only a partition in p


def _views(layers: Layers, fetch: Callable[[nn.Parameter], torch.Tensor]) -> Layers:
    return [(prefix, TensorSet([(n, _like(p, fetch(p))) for n, p in m.named_parameters()]))
            for prefix, m in layers]  # type: ignore[misc]


class OptimizerStateAccess(Protocol):
    """Full (unpartitioned) optimizer state of one parameter: what the engine's
    ``optimizer_state`` provides for DeepSpeed's optimizers and the fused one alike."""

    def full_state(self, p: nn.Parameter, key: str) -> torch.Tensor: ...

    def set_full_state(self, p: nn.Parameter, key: str, value: torch.Tensor) -> None: ...


def save_optimizer_state(layers: Layers, tp: TensorParallel, topo: Topology, ckpt_dir: Path,
                         cfg: ModelConfig, access: OptimizerStateAccess) -> None:
    """Write fp32 master weights and Adam moments (collective: every rank calls it): the pieces
    each rank owns where the optimizer says which (``owned_pieces``), else full parameters. Each
    directory records which state it holds."""
    for key in OPTIM_KEYS:
        if hasattr(access, "owned_pieces"):
            save_owned_state(layers, tp, topo, ckpt_dir / "optim" / key, cfg, access, key)
            continue
        views = _views(layers, lambda p, k=key: access.full_state(p, k).detach().float().cpu())
        save_model_weights(views, tp, topo, ckpt_dir / "optim" / key, cfg, extra={"state": key})
        del views


def optim_format(key_dir: Path) -> str:
    """``"pieces"`` or ``"weights"``: the format ``optim/<key>/`` is in, told by its index; a
    missing index is named as the one the directory's files need."""
    key_dir = Path(key_dir)
    if has_pieces(key_dir):
        return "pieces"
    if (key_dir / INDEX_NAME).is_file():
        return "weights"
    if not key_dir.is_dir():
        raise CheckpointError(f"{key_dir}: optimizer state directory not found (an incomplete "
                              "checkpoint)")
    if any(key_dir.glob("optim-*.safetensors")):
        raise CheckpointError(f"{key_dir / PIECES_INDEX}: optimizer pieces index not found, though "
                              "the directory holds optimizer pieces (deleted?)")
    raise CheckpointError(f"{key_dir / INDEX_NAME}: checkpoint index not found (no optimizer "
                          f"state index in {key_dir})")


Check = Callable[[str, nn.Parameter, torch.Tensor], None]


def _master_matches(key_dir: Path, name: str, p: nn.Parameter, value: torch.Tensor,
                    saved_dtype: str) -> None:
    """The fp32 master must round to the saved weights: within one unit of the coarser of the
    saved and the model's dtype (rounding to nearest, ties either way)."""
    w, m = p.detach().to("cpu", torch.float32), value.to("cpu", torch.float32)
    dtypes = [p.dtype, getattr(torch, saved_dtype, torch.float32)]
    eps = max(torch.finfo(d).eps for d in dtypes)
    tiny = max(torch.finfo(d).tiny for d in dtypes)
    off = (m - w).abs() > eps * m.abs() + tiny
    if off.any():
        i = int(off.reshape(-1).nonzero()[0])
        raise InvalidStateError(
            f"{key_dir}: {name}: {int(off.sum())} of {m.numel()} master weights differ from the "
            f"saved model weights (e.g. {m.reshape(-1)[i].item():.6g} vs "
            f"{w.reshape(-1)[i].item():.6g}); the optimizer state does not belong to these "
            "weights (state directories swapped?)")


def _validator(key: str, key_dir: Path, saved_dtypes: dict[str, str]) -> Check:
    """The check of one parameter's loaded ``key`` state (before it reaches the optimizer):
    finite; a second moment >= 0; a master weight consistent with the loaded model weights."""
    def check(name: str, p: nn.Parameter, value: torch.Tensor) -> None:
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise InvalidStateError(f"{key_dir}: {name}: {bad} non-finite value(s); the optimizer "
                                    "state is damaged (resume from another checkpoint)")
        if key == "exp_avg_sq" and (neg := int((value < 0).sum())):
            raise InvalidStateError(f"{key_dir}: {name}: {neg} negative value(s), but a second "
                                    "moment is >= 0 (damaged, or state directories swapped?)")
        if key == "fp32" and name in saved_dtypes and tuple(p.shape) == tuple(value.shape):
            _master_matches(key_dir, name, p, value, saved_dtypes[name])

    return check


def load_optimizer_state(layers: Layers, tp: TensorParallel, ckpt_dir: Path, cfg: ModelConfig,
                         access: OptimizerStateAccess) -> None:
    """Read master weights and moments from any saved layout into the optimizer (DeepSpeed's
    partitions or the fused optimizer's state), through ``access``; either format. Every value
    is checked before the optimizer sees it (:func:`_validator`; the model weights must be
    loaded first); collective: if any rank refuses, every rank raises."""
    saved = {n: e["dtype"] for n, e in read_index(ckpt_dir)["tensors"].items()}
    for key in OPTIM_KEYS:
        key_dir = ckpt_dir / "optim" / key
        check = _validator(key, key_dir, saved)
        if optim_format(key_dir) == "pieces" and hasattr(access, "owned_ranges"):
            load_owned_state(layers, tp, key_dir, cfg, access, key, check)  # its shard only
        elif optim_format(key_dir) == "pieces":
            def put(p: nn.Parameter, name: str, v: torch.Tensor, k: str = key,
                    check: Check = check) -> None:
                check(name, p, v)
                access.set_full_state(p, k, v.to(p.device))

            load_from_pieces(layers, tp, key_dir, cfg, put, state=key)
        else:
            _load_weights_format(layers, tp, key_dir, cfg, key, check, access)


def _load_weights_format(layers: Layers, tp: TensorParallel, key_dir: Path, cfg: ModelConfig,
                         key: str, check: Check, access: OptimizerStateAccess) -> None:
    views = _views(layers, lambda p: torch.zeros(_full_shape(p), dtype=torch.float32))
    load_model_weights(views, tp, key_dir, cfg)
    pairs = [(f"{prefix}.{n}", p, v.data)
             for (prefix, module), (_, view) in zip(layers, views, strict=True)
             for (n, p), (_, v) in zip(module.named_parameters(), view.named_parameters(),
                                       strict=True)]
    error = None
    try:
        extra = read_index(key_dir).get("extra")
        held = extra.get("state", key) if isinstance(extra, dict) else key
        if held != key:
            raise CheckpointError(f"{key_dir / INDEX_NAME}: holds the {held} state, not {key} "
                                  "(optimizer state directories swapped or renamed?)")
        for name, p, value in pairs:
            check(name, p, value)
    except CheckpointError as e:  # reported through all_or_none() so that every rank raises
        error = e
    all_or_none(error, f"loading {key_dir}")
    for _, p, value in pairs:
        access.set_full_state(p, key, value.to(p.device))


def check_finite_weights(layers: Layers, step: int, group: Any = None) -> None:
    """Before a checkpoint of ``step`` is committed: every rank's weights are finite, or every
    rank raises :class:`InvalidStateError` naming the step and the first bad tensor."""
    named = [(f"{prefix}.{n}", p) for prefix, m in layers for n, p in m.named_parameters()]
    ok = (torch.stack([torch.isfinite(p.detach()).all() for _, p in named]).cpu()
          if named else torch.ones(0, dtype=torch.bool))
    bad = next((n for (n, _), good in zip(named, ok.tolist(), strict=True) if not good), None)
    found = agree(bad, lambda xs: next(((r, x) for r, x in enumerate(xs) if x), None), group)
    if found is not None:
        raise InvalidStateError(f"step {step}: weight {found[1]} (rank {found[0]}) holds "
                                "non-finite values; its checkpoint is not written and the "
                                "previous one stays latest")


def check_training_checkpoint(ckpt_dir: Path, cfg: ModelConfig) -> None:
    """What can be checked of a full training checkpoint without reading tensors (before any
    collective): ``trainer_state.json``, the weights and each optimizer state directory in
    either format (indexes, model config and shapes, files' sizes and headers)."""
    ckpt_dir = Path(ckpt_dir)
    state = read_trainer_state(ckpt_dir)
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{ckpt_dir / STATE_NAME}: missing {', '.join(missing)}")
    check_weights(ckpt_dir, cfg)
    for key in OPTIM_KEYS:
        key_dir = ckpt_dir / "optim" / key
        if optim_format(key_dir) == "weights":
            check_weights(key_dir, cfg, state=key)
            continue
        index = read_pieces_index(key_dir, key)
        shapes = {n: e["shape"] for n, e in index["tensors"].items()}
        check_tensor_set(key_dir / PIECES_INDEX, shapes, cfg)
        check_piece_files(key_dir, index, key)


# ---- RNG and trainer state ---------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def save_rng(ckpt_dir: Path, rank: int) -> None:
    (ckpt_dir / "rng").mkdir(parents=True, exist_ok=True)
    write_text_atomic(ckpt_dir / "rng" / f"rank{rank:05d}.json", json.dumps(rng_state()))


def load_rng(ckpt_dir: Path, rank: int, same_layout: bool) -> None:
    """Restore this rank's RNG when the layout is unchanged (ranks then mean the same thing)."""
    path = ckpt_dir / "rng" / f"rank{rank:05d}.json"
    if same_layout and path.is_file():
        set_rng_state(json.loads(path.read_text()))


def write_trainer_state(ckpt_dir: Path, state: dict[str, Any]) -> None:
    write_text_atomic(ckpt_dir / STATE_NAME, json.dumps(state, indent=1) + "\n")


def read_trainer_state(ckpt_dir: Path) -> dict[str, Any]:
    return read_json_object(ckpt_dir / STATE_NAME, "the training state (corrupted)",
                            f"not found; {ckpt_dir} holds weights only, not a resumable "
                            "training state")
