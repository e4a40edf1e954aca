"""Training state that must never be resumed or committed, on one process (tp = dp = 1):

* loaded optimizer state is checked before the optimizer sees it, in both formats: finite, second
  moments >= 0, fp32 master weights that round to the saved model weights (a row per damage);
* non-finite weights are never committed: the save raises on every rank, no step directory
  appears and ``latest`` keeps naming the previous checkpoint;
* optimizer pieces must tile each tensor exactly (an overlap hiding an equal gap included);
* a version-1 pieces index (no state record, no file records, files without header records)
  still loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megallama.checkpoint.atomic import CheckpointError, latest_checkpoint
from megallama.checkpoint.pieces_index import check_tiling
from megallama.checkpoint.state import OPTIM_KEYS, load_optimizer_state, save_optimizer_state
from megallama.checkpoint.weights import load_model_weights, named_layers, save_model_weights
from megallama.config import preset
from megallama.config.train_config import TrainConfig
from megallama.model.llama import Transformer
from megallama.parallel.layers import TensorParallel
from megallama.parallel.topology import Grid, build_topology
from megallama.training.train_state import TrainingState

CFG = preset("tiny_gqa", vocab_size=256, n_layers=1)
TP, TOPO = TensorParallel(), build_topology(Grid())
WQ = "layers.0.attention.wq.weight"


def _model(dtype: torch.dtype = torch.float32) -> Transformer:
    return Transformer(CFG, seed=1).to(dtype)


def _state(model: Transformer) -> dict[str, dict[str, torch.Tensor]]:
    """Plausible AdamW state: the fp32 master the weights round to, small moments."""
    gen = torch.Generator().manual_seed(0)
    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in OPTIM_KEYS}
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen) * 1e-3
        master = p.detach().float() + (noise * 1e-3 * p.detach().float().abs()
                                       if p.dtype == torch.bfloat16 else 0)
        out["fp32"][name] = master
        out["exp_avg"][name] = noise
        out["exp_avg_sq"][name] = noise * noise
    return out


class _Access:
    """The optimizer side of a save (``values``) and of a load (records what it is given)."""

    def __init__(self, model: Transformer, values: dict | None = None, pieces: bool = False):
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.values, self.loaded = values or {}, {k: {} for k in OPTIM_KEYS}
        if pieces:  # two pieces per tensor, as two DP ranks would own them
            self.owned_pieces = self._halves

    def full_state(self, p, key):
        return self.values[key][self.names[id(p)]]

    def _halves(self, p, key):
        flat = self.full_state(p, key).reshape(-1)
        cut = flat.numel() // 2
        return [(0, flat[:cut]), (cut, flat[cut:])]

    def set_full_state(self, p, key, value):
        self.loaded[key][self.names[id(p)]] = value.clone()


def _save(path: Path, model: Transformer, values: dict, pieces: bool) -> Path:
    save_model_weights(named_layers(model), TP, TOPO, path, CFG)
    save_optimizer_state(named_layers(model), TP, TOPO, path, CFG, _Access(model, values, pieces))
    return path


def _load(path: Path, dtype: torch.dtype = torch.float32) -> _Access:
    model = _model(dtype)
    load_model_weights(named_layers(model), TP, path, CFG)
    access = _Access(model)
    load_optimizer_state(named_layers(model), TP, path, CFG, access)
    return access


def _nan(values: dict) -> None:
    values["exp_avg"][WQ][2, 3] = float("nan")


def _negative(values: dict) -> None:
    values["exp_avg_sq"][WQ][0, 0] = -1e-8


def _inf_master(values: dict) -> None:
    values["fp32"]["norm.weight"][7] = float("inf")


def _other_master(values: dict) -> None:
    values["fp32"][WQ] = values["fp32"][WQ] * 1.01


def _swap_unrecorded(path: Path, a: str, b: str) -> None:
    """Swap two state directories of the weights format and drop their state records, as in a
    checkpoint written before the records existed."""
    for key in (a, b):
        index_path = path / "optim" / key / "model.index.json"
        index = json.loads(index_path.read_text())
        index["extra"] = {}
        index_path.write_text(json.dumps(index))
    (path / "optim" / a).rename(path / "optim" / "x")
    (path / "optim" / b).rename(path / "optim" / a)
    (path / "optim" / "x").rename(path / "optim" / b)


LOAD_ROWS = [  # (id, pieces format?, damage to the saved values, damage to the files, message)
    ("nan-moment-pieces", True, _nan, None, f"optim/exp_avg: {WQ}: 1 non-finite value(s)"),
    ("nan-moment-weights", False, _nan, None,
     f"optim/exp_avg/model.index.json: {WQ}: 1 non-finite value(s)"),
    ("negative-second-moment-pieces", True, _negative, None,
     f"optim/exp_avg_sq: {WQ}: 1 negative value(s), but a second moment is >= 0"),
    ("negative-second-moment-weights", False, _negative, None,
     f"optim/exp_avg_sq: {WQ}: 1 negative value(s)"),
    ("inf-master-pieces", True, _inf_master, None, "optim/fp32: norm.weight: 1 non-finite"),
    ("master-of-other-weights-pieces", True, _other_master, None,
     f"optim/fp32: {WQ}: 16384 of 16384 master weights differ from the saved model weights"),
    ("moments-swapped-unrecorded-weights", False, None,
     lambda p: _swap_unrecorded(p, "exp_avg", "exp_avg_sq"), "negative value(s)"),
    ("master-and-moment-swapped-unrecorded-weights", False, None,
     lambda p: _swap_unrecorded(p, "fp32", "exp_avg"),
     "master weights differ from the saved model weights"),
]


@pytest.mark.parametrize("row", LOAD_ROWS, ids=[r[0] for r in LOAD_ROWS])
def test_loaded_optimizer_state_is_checked(row, tmp_path) -> None:
    _, pieces, change, damage, message = row
    model = _model()
    values = _state(model)
    if change is not None:
        change(values)
    path = _save(tmp_path / "ckpt", model, values, pieces)
    if damage is not None:
        damage(path)
    with pytest.raises(CheckpointError, match=r"optim/") as err:
        _load(path)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("pieces", [True, False], ids=["pieces", "weights"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_intact_state_loads_exactly(pieces, dtype, tmp_path) -> None:
    """No false alarm: a master that rounds to bf16 weights, at bf16 or at fp32, loads."""
    model = _model(dtype)
    values = _state(model)
    path = _save(tmp_path / "ckpt", model, values, pieces)
    for load_dtype in {dtype, torch.float32}:
        loaded = _load(path, load_dtype).loaded
        for key in OPTIM_KEYS:
            for name, value in values[key].items():
                assert torch.equal(loaded[key][name], value), (key, name)


class _Engine:
    """What TrainingState.save asks of the engine, over a plain model (no optimizer: the
    master is the weight, moments are zero)."""

    def __init__(self, model: Transformer) -> None:
        self.model, self.tp, self.skipped_steps = model, TP, 0
        zeros = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        self.optimizer_state = _Access(model, {"fp32": dict(model.named_parameters()),
                                               "exp_avg": zeros, "exp_avg_sq": zeros})

    def local_layers(self):
        return named_layers(self.model)

    def adam_step(self) -> int:
        return 0

    def scheduler_state(self) -> dict:
        return {}


class _Sampler:
    def state_dict(self) -> dict:
        return {}


def test_non_finite_weights_are_never_committed(tmp_path) -> None:
    cfg = TrainConfig()
    cfg.model, cfg.trainer.output_dir = CFG, str(tmp_path / "run")
    model = _model()
    state = TrainingState(_Engine(model), cfg, TOPO, _Sampler())  # type: ignore[arg-type]
    first = state.save(1)
    assert (first / "trainer_state.json").is_file()
    with torch.no_grad():
        dict(model.named_parameters())[WQ][5, 5] = float("nan")
    with pytest.raises(CheckpointError) as err:
        state.save(2)
    assert str(err.value).startswith(f"step 2: weight {WQ} (rank 0) holds non-finite values"), \
        str(err.value)
    root = first.parent
    assert latest_checkpoint(root) == first
    assert sorted(p.name for p in root.iterdir()) == ["latest", first.name]


TILING_ROWS = [  # (id, shape, boxes, fragment of the error or None)
    ("exact-2d", [4, 6], [[[0, 1], [0, 6]], [[1, 2], [0, 3]], [[1, 2], [3, 6]], [[2, 4], [0, 6]]],
     None),
    ("exact-split-columns", [4, 6], [[[0, 4], [0, 2]], [[0, 1], [2, 6]], [[1, 4], [2, 6]]], None),
    ("overlap-hides-gap", [4, 6], [[[1, 3], [0, 6]], [[2, 4], [0, 6]]],
     "rows [0, 1): they leave [0, 6) uncovered"),
    ("overlap-equal-gap-columns", [2, 6], [[[0, 2], [0, 3]], [[0, 2], [2, 5]]],
     "rows [0, 2): they overlap at 2"),
    ("gap-at-end", [4, 6], [[[0, 3], [0, 6]]], "rows [3, 4): they leave [0, 6) uncovered"),
    ("overlap-1d", [10], [[[0, 6]], [[5, 10]]], "they overlap at 5"),
    ("outside", [4, 6], [[[0, 5], [0, 6]]], "piece box [[0, 5], [0, 6]] outside its shape"),
]


@pytest.mark.parametrize("row", TILING_ROWS, ids=[r[0] for r in TILING_ROWS])
def test_pieces_must_tile_exactly(row) -> None:
    _, shape, boxes, message = row
    entry = {"shape": shape, "dtype": "float32",
             "pieces": [{"file": "f", "key": f"t@{i}", "box": b} for i, b in enumerate(boxes)]}
    if message is None:
        check_tiling("t", entry, "index")
        return
    with pytest.raises(CheckpointError, match="index: t: ") as err:
        check_tiling("t", entry, "index")
    assert message in str(err.value), str(err.value)


def test_version_1_pieces_without_records_still_load(tmp_path) -> None:
    """An index of format_version 1 without state or file records (nothing to check the files
    against) and files without header records load as before."""
    model = _model()
    values = _state(model)
    path = _save(tmp_path / "ckpt", model, values, pieces=True)
    for key in OPTIM_KEYS:
        key_dir = path / "optim" / key
        index = json.loads((key_dir / "pieces.index.json").read_text())
        index["format_version"] = 1
        index.pop("state", None)
        del index["files"]
        (key_dir / "pieces.index.json").write_text(json.dumps(index))
        for f in key_dir.glob("optim-*.safetensors"):
            save_file(load_file(f), f, metadata={"format": "pt",
                                                 "writer": "megallama-optim-pieces"})
    loaded = _load(path).loaded
    assert all(torch.equal(loaded[k][n], v) for k in OPTIM_KEYS for n, v in values[k].items())

