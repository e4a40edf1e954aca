"""Damaged checkpoints at ``trainer.resume`` and ``trainer.init_from``: one row per damage, each
ending in one line ``megallama.train: error: ...`` that names the file, exit status 2, no
traceback and (for what preflight finds) no run directory.

One real run (torchrun, dp 2, ``optim.impl=distributed``) saves the checkpoint every row starts
from; two copies of it are rewritten in-process by the checkpoint writers themselves: the
optimizer pieces one rank writes at dp 1, and the weights format ``impl=deepspeed``/``fused``
write. Each row damages a fresh copy and runs ``megallama.train.main`` in this process as rank 0
of 2: what preflight finds stops it before torch.distributed (which is made to fail the test if
reached). Only the two damages preflight cannot see (reading no tensor) launch torchrun: optimizer
state that is not finite, and a piece failing its checksum while loading.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

import megallama.train as train_cli
from megallama.checkpoint.pieces_index import PieceReader
from megallama.checkpoint.state import save_optimizer_state
from megallama.checkpoint.weights import named_layers
from megallama.config.compose import load_config
from megallama.config.grid import Grid
from megallama.model.llama import Transformer
from megallama.parallel.layers import TensorParallel
from megallama.parallel.topology import build_topology
from tests.distributed.cli import overrides, torchrun
from tests.distributed.test_cli_train import RANK_EXIT, ranks_output

pytestmark = pytest.mark.slow

PROG = "megallama.train"
DIST = ("optim.impl=distributed", "parallel.zero_stage=0", "optim.bucket_mb=0.05")
SHARD, DP0, DP1 = "model-pp00-tp00.safetensors", "optim-pp00-tp00-dp00.safetensors", \
    "optim-pp00-tp00-dp01.safetensors"
WQ = "layers.0.attention.wq.weight"
Transform = Callable[[str, str, torch.Tensor], torch.Tensor]


def _args(token_files: Path, out: Path, *extra: str) -> list[str]:
    return overrides(token_files, out, "trainer.eval_interval=0", "data.valid=[]", *DIST, *extra)


class _SavedState:
    """A checkpoint's optimizer state as one rank that owns all of it hands it to the writer
    (``owned``: the distributed optimizer's pieces, else full parameters), through ``change``."""

    def __init__(self, src: Path, names: dict[int, str], change: Transform | None) -> None:
        self.src, self.names, self.change = src, names, change

    def full_state(self, p: torch.nn.Parameter, key: str) -> torch.Tensor:
        with ExitStack() as stack:
            name = self.names[id(p)]
            value = PieceReader(self.src / "optim" / key, stack).read(
                name, [[0, n] for n in p.shape])
        return value if self.change is None else self.change(key, name, value)


class _OwnedState(_SavedState):
    def owned_pieces(self, p: torch.nn.Parameter, key: str) -> list[tuple[int, torch.Tensor]]:
        return [(0, self.full_state(p, key))]


def rewrite(src: Path, dst: Path, token_files: Path, pieces: bool,
            change: Transform | None = None) -> Path:
    """A copy of checkpoint ``src`` whose optimizer state is written again by the writers, at
    one rank: as the pieces a dp-1 run writes, or in the weights format."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("optim"))
    cfg = load_config(_args(token_files, dst / "unused")).model
    model = Transformer(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    access = (_OwnedState if pieces else _SavedState)(src, names, change)
    save_optimizer_state(named_layers(model), TensorParallel(), build_topology(Grid()), dst, cfg,
                         access)
    return dst


@pytest.fixture(scope="module")
def bases(token_files: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("damage")
    proc, _ = torchrun(2, PROG, _args(token_files, root / "run", "trainer.steps=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    dp2 = root / "run" / "checkpoints" / "step_00000002"
    assert (dp2 / "optim" / "exp_avg" / DP1).is_file()
    return {"dp2": dp2, "dp1": rewrite(dp2, root / "dp1", token_files, pieces=True),
            "weights": rewrite(dp2, root / "weights", token_files, pieces=False)}


# ---- damages -------------------------------------------------------------------------------------
def rm(rel: str) -> Callable[[Path], None]:
    return lambda d: (d / rel).unlink()


def truncate(rel: str) -> Callable[[Path], None]:
    return lambda d: (d / rel).write_bytes((d / rel).read_bytes()[:-100])


def overwrite(rel: str, text: str) -> Callable[[Path], None]:
    return lambda d: (d / rel).write_text(text)


def edit_header(rel: str, old: bytes, new: bytes) -> Callable[[Path], None]:
    """Replace the first ``old`` in a file's bytes (its safetensors header) by ``new``."""
    def damage(d: Path) -> None:
        data = (d / rel).read_bytes()
        assert old in data and len(old) == len(new)
        (d / rel).write_bytes(data.replace(old, new, 1))
    return damage


def swap(a: str, b: str) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        (d / a).rename(d / "swap.tmp")
        (d / b).rename(d / a)
        (d / "swap.tmp").rename(d / b)
    return damage


def edit_index(rel: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        index = json.loads((d / rel).read_text())
        edit(index["tensors"])
        (d / rel).write_text(json.dumps(index))
    return damage


def overlap(tensors: dict) -> None:
    """wq's first box moved down a row: it overlaps the second by a row and leaves row 0."""
    box = tensors[WQ]["pieces"][0]["box"]
    box[0] = [box[0][0] + 1, box[0][1] + 1]


def swap_boxes(tensors: dict) -> None:
    first, second = tensors[WQ]["pieces"]
    first["box"], second["box"] = second["box"], first["box"]


def shrink(tensors: dict) -> None:
    tensors[WQ]["pieces"][0]["box"][0][1] -= 1


def swap_tensors(tensors: dict) -> None:
    wk, wv = "layers.0.attention.wk.weight", "layers.0.attention.wv.weight"
    tensors[wk]["pieces"], tensors[wv]["pieces"] = tensors[wv]["pieces"], tensors[wk]["pieces"]


def drop_key(rel: str, key: str) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        state = json.loads((d / rel).read_text())
        del state[key]
        (d / rel).write_text(json.dumps(state))
    return damage


AVG, SQ = "optim/exp_avg", "optim/exp_avg_sq"
ROWS = [  # (id, base checkpoint, option, damage, extra overrides, fragments of the error line)
    ("init-other-shape", "dp2", "init_from", None, ["model.n_layers=3"],
     ["model.index.json: model config differs", "n_layers: checkpoint 2 != model 3"]),
    ("resume-other-shape", "dp2", "resume", None, ["model.n_layers=3"],
     ["model.index.json: model config differs", "n_layers: checkpoint 2 != model 3"]),
    ("init-shard-missing", "weights", "init_from", rm(SHARD), [],
     [f"{SHARD}: checkpoint shard is missing"]),
    ("resume-shard-truncated", "dp2", "resume", truncate(SHARD), [],
     [f"{SHARD}: ", "truncated or was not completely written"]),
    ("init-shard-edited", "dp1", "init_from",
     edit_header(SHARD, WQ.encode(), WQ.replace("wq", "wx").encode()), [],
     [f"{SHARD}: tensor {WQ} is missing from the shard"]),
    ("resume-index-edited", "dp2", "resume", overwrite("model.index.json", "{"), [],
     ["model.index.json: checkpoint index is not valid JSON"]),
    ("resume-trainer-state-edited", "dp2", "resume",
     drop_key("trainer_state.json", "adam_step"), [], ["trainer_state.json: missing adam_step"]),
    # optimizer pieces, dp 2
    ("dp2-piece-missing", "dp2", "resume", rm(f"{AVG}/{DP1}"), [],
     [f"{AVG}/{DP1}: checkpoint shard is missing (listed in "]),
    ("dp2-piece-truncated", "dp2", "resume", truncate(f"{AVG}/{DP0}"), [],
     [f"{AVG}/{DP0}: ", "truncated or was not completely written"]),
    ("dp2-pieces-index-deleted", "dp2", "resume", rm(f"{SQ}/pieces.index.json"), [],
     [f"{SQ}/pieces.index.json: optimizer pieces index not found"]),
    ("dp2-pieces-index-edited", "dp2", "resume", overwrite(f"{AVG}/pieces.index.json", "[1,"),
     [], [f"{AVG}/pieces.index.json: optimizer pieces index is not valid JSON"]),
    ("dp2-boxes-overlap", "dp2", "resume", edit_index(f"{AVG}/pieces.index.json", overlap), [],
     [f"{WQ}: the pieces' boxes do not tile its shape [128, 128]"]),
    ("dp2-boxes-swapped", "dp2", "resume",
     edit_index(f"{AVG}/pieces.index.json", swap_boxes), [],
     [f"piece {WQ}@0 in {DP0}: box [[64, 128], [0, 128]], but the file records [[0, 64]"]),
    ("dp2-files-swapped", "dp2", "resume", swap(f"{AVG}/{DP0}", f"{AVG}/{DP1}"), [],
     [f"{AVG}/{DP0}: ", f"holds the data of {DP1} (files swapped or renamed?)"]),
    ("dp2-state-dirs-swapped", "dp2", "resume", swap(AVG, SQ), [],
     [f"{AVG}/pieces.index.json: holds the exp_avg_sq state, not exp_avg"]),
    # optimizer pieces, dp 1
    ("dp1-piece-missing", "dp1", "resume", rm(f"{SQ}/{DP0}"), [],
     [f"{SQ}/{DP0}: checkpoint shard is missing"]),
    ("dp1-piece-truncated", "dp1", "resume", truncate(f"{SQ}/{DP0}"), [],
     [f"{SQ}/{DP0}: ", "truncated or was not completely written"]),
    ("dp1-pieces-index-deleted", "dp1", "resume", rm(f"{AVG}/pieces.index.json"), [],
     [f"{AVG}/pieces.index.json: optimizer pieces index not found"]),
    ("dp1-box-gap", "dp1", "resume", edit_index(f"{AVG}/pieces.index.json", shrink), [],
     [f"{WQ}: the pieces' boxes do not tile its shape [128, 128]", "uncovered"]),
    ("dp1-tensors-swapped", "dp1", "resume",
     edit_index(f"{AVG}/pieces.index.json", swap_tensors), [],
     ["layers.0.attention.wk.weight: piece layers.0.attention.wv.weight@0 is another tensor's"]),
    ("dp1-files-of-two-states-swapped", "dp1", "resume", swap(f"{AVG}/{DP0}", f"{SQ}/{DP0}"),
     [], [f"{AVG}/{DP0}: holds exp_avg_sq state, not exp_avg"]),
    ("dp1-state-dirs-swapped", "dp1", "resume", swap(AVG, SQ), [],
     [f"{AVG}/pieces.index.json: holds the exp_avg_sq state, not exp_avg"]),
    # optimizer state in the weights format (optim.impl=deepspeed / fused)
    ("weights-optim-index-deleted", "weights", "resume", rm(f"{AVG}/model.index.json"), [],
     [f"{AVG}/model.index.json: checkpoint index not found"]),
    ("weights-optim-shard-truncated", "weights", "resume", truncate(f"{SQ}/{SHARD}"), [],
     [f"{SQ}/{SHARD}: ", "truncated or was not completely written"]),
    ("weights-optim-state-dirs-swapped", "weights", "resume", swap(AVG, SQ), [],
     [f"{AVG}/model.index.json: holds the exp_avg_sq state, not exp_avg"]),
]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_damaged_checkpoint_stops_in_preflight(row, bases, token_files, tmp_path, monkeypatch,
                                               capsys) -> None:
    """Rank 0 of 2, in this process: exit 2 with one line before torch.distributed starts."""
    name, base, option, damage, extra, fragments = row
    ckpt = tmp_path / "ckpt"
    shutil.copytree(bases[base], ckpt)
    if damage is not None:
        damage(ckpt)
    out = tmp_path / "run"

    def started(*_):
        raise AssertionError(f"{name}: preflight passed, torch.distributed was started")

    monkeypatch.setattr(train_cli, "init_distributed", started)
    monkeypatch.setattr(train_cli.faulthandler, "register", lambda *a, **k: None)  # captured
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MEGALLAMA_DEBUG", raising=False)
    code = train_cli.main(_args(token_files, out, f"trainer.{option}={ckpt}", *extra))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    line = err.strip()
    assert line.startswith(f"{PROG}: error: trainer.{option}={ckpt}: "), line
    assert all(f in line for f in fragments), (fragments, line)
    assert "truncated" not in line or "truncated" in " ".join(fragments), line
    assert not out.exists()


def _launch_fails(token_files: Path, out: Path, ckpt: Path, fragments: list[str]) -> None:
    """A 2-rank run resumed from ``ckpt`` stops on every rank with one line and exit 2."""
    proc, _ = torchrun(2, PROG, _args(token_files, out, "trainer.steps=4",
                                      f"trainer.resume={ckpt}"), env={"MEGALLAMA_DEBUG": ""})
    exits = dict(RANK_EXIT.findall(proc.stderr))
    assert proc.returncode != 0 and "2" in exits.values() and set(exits.values()) <= {"2", "-15"}, \
        proc.stderr[-3000:]
    ours = ranks_output(proc.stderr)
    assert "Traceback" not in ours, ours[-3000:]
    last = ours.strip().splitlines()[-1]
    assert last.startswith(f"{PROG}: error: ") and all(f in last for f in fragments), ours[-3000:]
    assert not (out / "checkpoints").exists()  # nothing committed


def test_non_finite_optimizer_state_is_refused_at_resume(bases, token_files, tmp_path) -> None:
    """A well-formed checkpoint (checksums right) whose exp_avg holds a NaN: every rank stops
    with one line naming the directory and tensor (it was loaded, and the first update made every
    weight NaN, committed as the next checkpoint with exit status 0)."""
    def nan(key: str, name: str, value: torch.Tensor) -> torch.Tensor:
        if key == "exp_avg" and name == WQ:
            value = value.clone()
            value[3, 5] = float("nan")
        return value

    ckpt = rewrite(bases["dp2"], tmp_path / "nan", token_files, pieces=True, change=nan)
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    _launch_fails(token_files, tmp_path / "run", ckpt,
                  [f"{ckpt}/optim/exp_avg: {WQ}: 1 non-finite value(s)"])
    assert before == {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}


def test_piece_failing_its_checksum_stops_every_rank(bases, token_files, tmp_path) -> None:
    """A byte of a piece's data changed (size and header intact, so preflight passes): found
    while loading, one line and exit 2 on every rank (was a traceback on every rank)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(bases["dp2"], ckpt)
    piece = ckpt / "optim" / "fp32" / DP1
    data = bytearray(piece.read_bytes())
    data[-1] ^= 0x40
    piece.write_bytes(bytes(data))
    _launch_fails(token_files, tmp_path / "run", ckpt,
                  [f"{piece}: sha256 checksum mismatch", "the file is corrupted"])
