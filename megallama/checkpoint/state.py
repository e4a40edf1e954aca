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

from megallama.checkpoint.atomic import CheckpointError, write_text_atomic
from megallama.checkpoint.optim_pieces import has_pieces, load_from_pieces, save_owned_state
from megallama.checkpoint.weights import load_model_weights, save_model_weights
from megallama.config import ModelConfig
from megallama.parallel.layers import TensorParallel
from megallama.parallel.topology import Topology

OPTIM_KEYS = ("fp32", "exp_avg", "exp_avg_sq")
STATE_NAME = "trainer_state.json"
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
    for attr in ("partition_dim", "tp_replicas"):
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
    each rank owns where the optimizer says which (``owned_pieces``), else full parameters."""
    for key in OPTIM_KEYS:
        if hasattr(access, "owned_pieces"):
            save_owned_state(layers, tp, topo, ckpt_dir / "optim" / key, cfg, access, key)
            continue
        views = _views(layers, lambda p, k=key: access.full_state(p, k).detach().float().cpu())
        save_model_weights(views, tp, topo, ckpt_dir / "optim" / key, cfg)
        del views


def load_optimizer_state(layers: Layers, tp: TensorParallel, ckpt_dir: Path, cfg: ModelConfig,
                         access: OptimizerStateAccess) -> None:
    """Read master weights and moments from any saved layout into the optimizer (DeepSpeed's
    partitions or the fused optimizer's state), through ``access``; either format."""
    for key in OPTIM_KEYS:
        if has_pieces(ckpt_dir / "optim" / key):
            load_from_pieces(layers, tp, ckpt_dir / "optim" / key, cfg,
                             lambda p, v, k=key: access.set_full_state(p, k, v.to(p.device)))
            continue
        views = _views(layers, lambda p: torch.zeros(_full_shape(p), dtype=torch.float32))
        load_model_weights(views, tp, ckpt_dir / "optim" / key, cfg)
        for (_, module), (_, view) in zip(layers, views, strict=True):
            for (_, p), (_, v) in zip(module.named_parameters(), view.named_parameters(),
                                      strict=True):
                access.set_full_state(p, key, v.data.to(p.device))


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
    path = ckpt_dir / STATE_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; {ckpt_dir} holds weights only, not a "
                              "resumable training state")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupted ({e})") from None
