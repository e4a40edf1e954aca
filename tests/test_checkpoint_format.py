"""The weights checkpoint format on one process (tp=1): round trip, index content, every corruption
and mismatch a loader must name, and the crash-safe commit of step directories."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megallama.checkpoint.atomic import (
    CheckpointError,
    checkpoint_writer,
    latest_checkpoint,
    list_checkpoints,
    save_checkpoint_dir,
)
from megallama.checkpoint.weights import (
    INDEX_NAME,
    iter_full_tensors,
    load_model_weights,
    named_layers,
    read_full_tensor,
    read_index,
    save_model_weights,
)
from megallama.config import preset
from megallama.model.llama import Transformer
from megallama.parallel.layers import TensorParallel
from megallama.parallel.topology import Grid, build_topology

CFG = preset("tiny_gqa", vocab_size=1001, n_layers=2)
SHARD = "model-pp00-tp00.safetensors"
TP = TensorParallel()
TOPO = build_topology(Grid())


def _model(seed: int = 3, cfg=CFG, dtype=torch.float32) -> Transformer:
    """A model whose weights are not its seeded init (noise added), so loads are visible."""
    model = Transformer(cfg, seed=seed).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=gen) * 0.1).to(dtype))
    return model


def _save(root: Path, step: int = 1, model=None, cfg=CFG, layers=None, **kw) -> Path:
    model = model if model is not None else _model(cfg=cfg)
    layers = layers if layers is not None else named_layers(model)
    with checkpoint_writer(root, step, **kw) as tmp:
        save_model_weights(layers, TP, TOPO, tmp, cfg, extra={"step": step})
    return root / f"step_{step:08d}"


def _load(ckpt: Path, cfg=CFG, model_cfg=CFG, strict: bool = True) -> Transformer:
    model = Transformer(cfg, seed=99)
    load_model_weights(named_layers(model), TP, ckpt, model_cfg, strict=strict)
    return model


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


@pytest.fixture
def saved(tmp_path):
    model = _model()
    return model, _save(tmp_path / "ckpt", model=model)


# ---- round trip and index ------------------------------------------------------------------------
def test_round_trip_and_full_tensor_readers(saved):
    model, ckpt = saved
    assert _same(model, _load(ckpt))
    state = model.state_dict()
    assert torch.equal(read_full_tensor(ckpt, "layers.1.attention.wk.weight"),
                       state["layers.1.attention.wk.weight"])
    streamed = list(iter_full_tensors(ckpt))
    assert [n for n, _ in streamed] == list(state)  # model order
    assert all(torch.equal(t, state[n]) for n, t in streamed)
    with pytest.raises(CheckpointError, match="no tensor named 'lm_head.weight'"):
        read_full_tensor(ckpt, "lm_head.weight")


def test_bf16_modules_are_stored_in_bf16(tmp_path):
    model = _model(dtype=torch.bfloat16)
    ckpt = _save(tmp_path, model=model)
    index = read_index(ckpt)
    assert {t["dtype"] for t in index["tensors"].values()} == {"bfloat16"}
    loaded = _load(ckpt)  # an fp32 model: values are the bf16 ones, exactly
    sd = loaded.state_dict()
    assert all(torch.equal(v.float(), sd[k]) for k, v in model.state_dict().items())


def test_index_content(saved):
    model, ckpt = saved
    index = json.loads((ckpt / INDEX_NAME).read_text())
    assert index["format"] == "megallama-weights" and index["format_version"] == 1
    assert index["model_config"] == CFG.to_dict() and index["extra"] == {"step": 1}
    assert index["saved_layout"] == {"tp": 1, "pp": 1, "dp": 1}
    data = (ckpt / SHARD).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert index["files"] == {SHARD: {"size": len(data), "sha256": digest}}
    tensors = index["tensors"]
    assert set(tensors) == set(model.state_dict())
    for name, p in model.state_dict().items():
        assert tensors[name]["shape"] == list(p.shape) and tensors[name]["dtype"] == "float32"
        along = p.shape[tensors[name]["split_dim"] or 0]
        assert tensors[name]["pieces"] == [{"file": SHARD, "offset": 0, "length": along}]
    assert tensors["output.weight"]["shape"] == [1001, 128]
    assert tensors["layers.0.attention.wk.weight"]["shape"] == [32, 128]  # 2 KV heads x 16
    assert tensors["layers.0.attention.wq.weight"]["split_dim"] == 0
    assert tensors["layers.0.feed_forward.w2.weight"]["split_dim"] == 1
    assert tensors["norm.weight"]["split_dim"] is None
    with safe_open(ckpt / SHARD, framework="pt") as f:  # plain safetensors, global names
        assert set(f.keys()) == set(tensors)


# ---- corruption: each error names the file -------------------------------------------------------
def test_truncated_shard(saved):
    _, ckpt = saved
    with open(ckpt / SHARD, "r+b") as f:
        f.truncate((ckpt / SHARD).stat().st_size - 100)
    with pytest.raises(CheckpointError, match=f"{SHARD}: .* bytes, expected .*truncated"):
        _load(ckpt)


def test_flipped_byte_fails_checksum(saved):
    model, ckpt = saved
    assert _same(model, _load(ckpt))  # verified once (and cached) before the corruption
    with open(ckpt / SHARD, "r+b") as f:
        f.seek(-1000, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1000, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CheckpointError, match=f"{SHARD}: sha256 checksum mismatch"):
        _load(ckpt)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        read_full_tensor(ckpt, "output.weight")


def _rewrite_shard(ckpt: Path, tensors: dict, raw: bytes | None = None) -> None:
    """Replace the shard and fix its size/sha256 in the index, so only the content is wrong."""
    if raw is None:
        save_file(tensors, ckpt / SHARD)
    else:
        (ckpt / SHARD).write_bytes(raw)
    index = json.loads((ckpt / INDEX_NAME).read_text())
    data = (ckpt / SHARD).read_bytes()
    index["files"][SHARD] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / INDEX_NAME).write_text(json.dumps(index))


def test_bad_safetensors_header(saved):
    _, ckpt = saved
    _rewrite_shard(ckpt, {}, raw=b"\xff" * 64)
    with pytest.raises(CheckpointError, match=f"{SHARD}: not a readable safetensors file"):
        _load(ckpt)


def test_shard_disagrees_with_index(saved):
    model, ckpt = saved
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    del sd["norm.weight"]
    sd["output.weight"] = sd["output.weight"][:1000].clone()
    _rewrite_shard(ckpt, sd)
    with pytest.raises(CheckpointError, match=f"{SHARD}: tensor norm.weight is missing from the"):
        read_full_tensor(ckpt, "norm.weight")
    with pytest.raises(CheckpointError, match=r"output.weight has shape \[1000, 128\], the index"):
        read_full_tensor(ckpt, "output.weight")


def test_missing_shard_and_missing_or_bad_index(saved):
    _, ckpt = saved
    (ckpt / SHARD).rename(ckpt / "moved")
    with pytest.raises(CheckpointError, match=f"{SHARD}: checkpoint shard is missing"):
        _load(ckpt)
    (ckpt / INDEX_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{INDEX_NAME}: checkpoint index is not valid JSON"):
        _load(ckpt)
    index_text = json.dumps({"format": "megallama-weights", "format_version": 1, "files": {},
                             "model_config": {}, "tensors": {"x": {"shape": [4]}}})
    (ckpt / INDEX_NAME).write_text(index_text)
    with pytest.raises(CheckpointError, match=f"{INDEX_NAME}: malformed checkpoint index"):
        read_index(ckpt)
    (ckpt / INDEX_NAME).unlink()
    with pytest.raises(CheckpointError, match=f"{INDEX_NAME}: checkpoint index not found"):
        _load(ckpt)


# ---- mismatches between checkpoint and model -----------------------------------------------------
def test_missing_and_unexpected_tensors(tmp_path):
    model = _model()
    no_head = _save(tmp_path, 1, model=model, layers=named_layers(model)[:-1])
    with pytest.raises(CheckpointError, match=f"{INDEX_NAME}: 1 model tensor.*missing from the "
                                              "checkpoint: output.weight"):
        _load(no_head)
    loaded = _load(no_head, strict=False)  # everything else loads; the head keeps its init
    assert torch.equal(loaded.norm.weight, model.norm.weight)
    assert torch.equal(loaded.output.weight, Transformer(CFG, seed=99).output.weight)

    deeper = preset("tiny_gqa", vocab_size=1001, n_layers=3)
    extra = _save(tmp_path, 2, model=_model(cfg=deeper), cfg=deeper)
    with pytest.raises(CheckpointError, match="9 checkpoint tensor.*not in the model: layers.2."):
        _load(extra, model_cfg=None)
    _load(extra, model_cfg=None, strict=False)


def test_shape_and_config_mismatch(saved):
    _, ckpt = saved
    wider_ffn = preset("tiny_gqa", vocab_size=1001, n_layers=2, multiple_of=64)  # 384, not 352
    with pytest.raises(CheckpointError, match=r"layers.0.feed_forward.w1.weight: checkpoint shape "
                                              r"\[352, 128\] != model shape \[384, 128\]; the "
                                              "checkpoint is for a different model config"):
        _load(ckpt, cfg=wider_ffn, model_cfg=None)
    other = preset("tiny_gqa", vocab_size=1000, n_layers=2, norm_eps=1e-6)
    with pytest.raises(CheckpointError, match=f"{INDEX_NAME}: model config differs.*vocab_size: "
                                              "checkpoint 1001 != model 1000; norm_eps"):
        _load(ckpt, cfg=other, model_cfg=other)
    with pytest.raises(CheckpointError, match=r"tok_embeddings.weight: checkpoint shape "
                                              r"\[1001, 128\] != model shape \[1000, 128\]"):
        _load(ckpt, cfg=other, model_cfg=None)  # without a config, the shapes still catch it
    seeded_differently = preset("tiny_gqa", vocab_size=1001, n_layers=2, init_std=0.5)
    _load(ckpt, model_cfg=seeded_differently)  # init_std does not describe trained weights


# ---- crash-safe commit ---------------------------------------------------------------------------
def test_failed_save_commits_nothing(tmp_path):
    model = _model()
    good = _save(tmp_path, 10, model=model)
    with pytest.raises(RuntimeError, match="optimizer state failed"):
        with checkpoint_writer(tmp_path, 20) as tmp:
            save_model_weights(named_layers(_model(seed=5)), TP, TOPO, tmp, CFG)
            raise RuntimeError("optimizer state failed")
    assert not (tmp_path / "step_00000020").exists()
    assert not (tmp_path / "step_00000020.tmp").exists()
    assert (tmp_path / "latest").read_text() == "step_00000010\n"
    assert latest_checkpoint(tmp_path) == good and _same(model, _load(good))


def test_crash_leftovers_are_ignored_and_cleaned(tmp_path):
    good = _save(tmp_path, 10)
    stale = tmp_path / "step_00000015.tmp"  # a save killed mid-way leaves its temp directory
    stale.mkdir()
    (stale / SHARD).write_bytes(b"partial")
    same_step = tmp_path / "step_00000030.tmp"
    same_step.mkdir()
    (same_step / "junk").write_text("from a crashed attempt at step 30")
    assert latest_checkpoint(tmp_path) == good and list_checkpoints(tmp_path) == [(10, good)]
    ckpt = _save(tmp_path, 30)
    assert not stale.exists() and not same_step.exists() and not (ckpt / "junk").exists()
    assert latest_checkpoint(tmp_path) == ckpt


def test_keep_last_prunes_oldest(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000004"
    _save(tmp_path, 5, keep_last=None)  # None keeps everything
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest", "step_00000003", "step_00000004", "step_00000005"]


def test_resave_same_step_and_latest_fallback(tmp_path):
    first, second = _model(seed=1), _model(seed=2)
    _save(tmp_path, 7, model=first)
    ckpt = _save(tmp_path, 7, model=second)  # replaces the committed step 7
    assert _same(second, _load(ckpt)) and [s for s, _ in list_checkpoints(tmp_path)] == [7]
    _save(tmp_path, 3)
    (tmp_path / "latest").write_text("step_00000099\n")  # names no committed directory
    assert latest_checkpoint(tmp_path) == ckpt  # the newest committed one
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path) == ckpt
    assert latest_checkpoint(tmp_path / "absent") is None


def test_save_checkpoint_dir_with_trainer_files(tmp_path):
    model = _model()

    def write(tmp: Path) -> None:
        save_model_weights(named_layers(model), TP, TOPO, tmp, CFG)
        torch.save({"step": 12}, tmp / "trainer-state.pt")

    ckpt = save_checkpoint_dir(tmp_path, 12, write, keep_last=1)
    assert ckpt == latest_checkpoint(tmp_path) == tmp_path / "step_00000012"
    assert torch.load(ckpt / "trainer-state.pt") == {"step": 12}
    assert _same(model, _load(ckpt))


def test_layer_given_twice_is_refused_and_nothing_committed(tmp_path):
    model = _model()
    layers = named_layers(model)
    with pytest.raises(CheckpointError, match="norm.weight: given twice in the layer list"):
        _save(tmp_path, 1, model=model, layers=layers + [("norm", model.norm)])
    assert latest_checkpoint(tmp_path) is None and list(tmp_path.iterdir()) == []
