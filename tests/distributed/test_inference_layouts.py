"""The inference loader at every layout, on real gloo processes.

Checks: the validation loss at (tp, pp) = (1, 2), (2, 2), (2, 1) and (1, 1) x dp equals the
single-process (1, 1) value within fp32 round-off; greedy and seeded sampled generation at
(2, 2) equal (1, 1) token for token on every rank; each stage builds only its layers and a KV
cache of only its blocks; no optimizer is built and DeepSpeed is never imported; evaluation's
peak RSS is below a training step's on the same model; evaluate and generate find the
``tokenizer.model`` of a converted checkpoint without ``--tokenizer`` (also at pp = 2 under
torchrun); checkpoint / tokenizer lookup.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megallama import evaluate as evaluate_cli
from megallama import generate as generate_cli
from megallama.checkpoint.atomic import CheckpointError
from megallama.checkpoint.lookup import find_checkpoint, find_tokenizer, run_config_of
from megallama.checkpoint.weights import save_model_weights
from megallama.config import preset
from megallama.config.compose import save_config
from megallama.config.grid import Grid
from megallama.config.train_config import TrainConfig
from megallama.data.tokenizer import Tokenizer
from megallama.inference.evaluation import validation_loss
from megallama.inference.generation import Sampling, generate
from megallama.inference.loader import load_for_inference
from megallama.interop.convert import convert
from megallama.model import layout
from megallama.model.llama import Transformer
from megallama.parallel.topology import Topology
from tests.distributed.cli import REPO, VOCAB, overrides, torchrun
from tests.distributed.harness import run_world

SEQ, BATCH, MAX_BATCHES = 32, 4, 3
PROMPTS = [[1, 5, 9, 13, 17], [1, 100, 101], [1]]
NEW = 12
SAMPLING = Sampling(temperature=0.9, top_k=40, top_p=0.95, seed=3)


def _model_config(vocab: int = VOCAB):
    return preset("tiny_gqa", vocab_size=vocab, n_layers=3)  # 3 blocks: uneven stages at pp=2


def _save_run(run: Path, model: Transformer, step: int = 2) -> Path:
    """A run directory as training leaves it: config.yaml + checkpoints/step_N/."""
    cfg = TrainConfig()
    cfg.model, cfg.data.seq_len = model.cfg, SEQ
    save_config(cfg, run / "config.yaml")
    step_dir = run / "checkpoints" / f"step_{step:08d}"
    save_model_weights(model.named_layers(), model.tp, Topology(grid=Grid(), rank=0), step_dir,
                       model.cfg)
    return step_dir


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("inference") / "run"
    _save_run(run, Transformer(_model_config(), seed=3))
    return run


# ---- lookup --------------------------------------------------------------------------------------
def test_lookup(tmp_path) -> None:
    model = Transformer(_model_config(), seed=1)
    run = tmp_path / "run"
    old = _save_run(run, model, step=1)
    new = _save_run(run, model, step=2)
    assert find_checkpoint(run) == find_checkpoint(run / "checkpoints") == new
    assert find_checkpoint(old) == old
    assert run_config_of(new) == run / "config.yaml"
    assert run_config_of(tmp_path) is None
    with pytest.raises(CheckpointError, match="no checkpoint"):
        find_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        find_checkpoint(tmp_path / "absent")
    assert find_tokenizer(new) is None  # the run's data.tokenizer is unset
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"x")
    cfg = TrainConfig()
    cfg.model, cfg.data.tokenizer = model.cfg, str(tok)
    save_config(cfg, run / "config.yaml")
    assert find_tokenizer(new) == tok  # the run's tokenizer
    shutil.copyfile(tok, run / "checkpoints" / "tokenizer.model")
    assert find_tokenizer(new) == run / "checkpoints" / "tokenizer.model"  # Meta's layout
    shutil.copyfile(tok, new / "tokenizer.model")
    assert find_tokenizer(new) == new / "tokenizer.model"  # beside the weights


# ---- layouts -------------------------------------------------------------------------------------
def _layouts_worker(rank: int, world: int, run: str, data: str, ref: dict,
                    greedy: list, sampled: list) -> None:
    for tp, pp in ((1, 2), (2, 2), (2, 1), (1, 1)):  # dp = 2, 1, 2, 4
        dp = world // (tp * pp)
        model = load_for_inference(Path(run), tp=tp, pp=pp)
        cuts = layout.stage_cuts(model.cfg, pp, SEQ)
        assert model.names == layout.layer_names(model.cfg)[cuts[model.topo.pp_rank]:
                                                            cuts[model.topo.pp_rank + 1]]
        assert ("output" in model.names) == model.is_last_stage
        assert model.new_cache(1, 4).k.shape[0] == model.n_blocks  # only this stage's blocks
        got = validation_loss(model, [data], seq_len=SEQ, batch_size=BATCH,
                              micro_batch_size=2 if dp <= 2 else 1, max_batches=MAX_BATCHES)
        assert got["tokens"] == ref["tokens"], (tp, pp, got)
        assert abs(got["val_loss"] - ref["val_loss"]) <= 1e-5 * ref["val_loss"], (tp, pp, got, ref)
        if (tp, pp) == (2, 2):
            assert generate(model, PROMPTS, NEW) == greedy, "greedy at (2, 2) != (1, 1)"
            assert generate(model, PROMPTS, NEW, SAMPLING) == sampled, "sampling at (2, 2)"
            assert generate(model, PROMPTS, 4, use_cache=False) == [g[:4] for g in greedy]
        assert not any(p.requires_grad for p in model.parameters())
        assert not any(isinstance(o, torch.optim.Optimizer) for o in gc.get_objects())
    assert "deepspeed" not in sys.modules, "inference imported DeepSpeed"


def test_every_layout_matches_one_process(tiny_run, token_files) -> None:
    data = str(token_files / "val")
    model = load_for_inference(tiny_run)  # (1, 1) in this process, no torch.distributed
    assert model.tokenizer is None and model.names == layout.layer_names(model.cfg)
    ref = validation_loss(model, [data], seq_len=SEQ, batch_size=BATCH, max_batches=MAX_BATCHES)
    assert ref["tokens"] == MAX_BATCHES * BATCH * SEQ
    whole = Transformer(_model_config(), seed=3).eval()  # the weights that were saved
    greedy = generate(model, PROMPTS, NEW)
    assert greedy == generate(whole, PROMPTS, NEW)
    sampled = generate(model, PROMPTS, NEW, SAMPLING)
    run_world(4, _layouts_worker, str(tiny_run), data, ref, greedy, sampled)


# ---- memory and imports --------------------------------------------------------------------------
_MEASURE = """
import json, runpy, sys
module, sys.argv = sys.argv[1], sys.argv[1:]
code = 0
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code or 0
# VmHWM, not ru_maxrss: the latter survives exec, so it would report the parent (pytest) process
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"rc": code, "deepspeed": "deepspeed" in sys.modules,
                  "peak_rss_mib": int(hwm.split()[1]) / 1024}), file=sys.stderr)
"""


def _measure(module: str, args: list[str]) -> tuple[dict, str]:
    """Run ``python -m module args`` as one process: (its exit code, peak RSS, whether DeepSpeed
    was imported) and its stdout."""
    proc = subprocess.run([sys.executable, "-c", _MEASURE, module, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    assert stats["rc"] == 0, proc.stderr[-3000:]
    return stats, proc.stdout


@pytest.mark.slow
def test_evaluation_needs_less_memory_than_training(tiny_run, token_files, tmp_path) -> None:
    ev, out = _measure("megallama.evaluate", [
        "--checkpoint", str(tiny_run), "--data", str(token_files / "val"),
        "--batch-size", str(BATCH), "--max-batches", str(MAX_BATCHES), "--device", "cpu"])
    assert json.loads(out.strip().splitlines()[-1])["tokens"] == MAX_BATCHES * BATCH * SEQ
    tr, _ = _measure("megallama.train", overrides(
        token_files, tmp_path / "train", "model.n_layers=3", "trainer.steps=1",
        "trainer.eval_interval=0", "data.valid=[]", "trainer.save_final=false"))
    print(f"\npeak RSS: evaluation {ev['peak_rss_mib']:.0f} MiB, one training step "
          f"{tr['peak_rss_mib']:.0f} MiB")
    assert not ev["deepspeed"] and tr["deepspeed"]
    assert ev["peak_rss_mib"] < tr["peak_rss_mib"]


# ---- tokenizer beside a converted checkpoint -----------------------------------------------------
_TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
         "fortune, must be in want of a wife. However little known the feelings or views of such "
         "a man may be on his first entering a neighbourhood, this truth is so well fixed in the "
         "minds of the surrounding families, that he is considered as the rightful property of "
         "some one or other of their daughters.\n") * 4


def _converted(tmp_path: Path, tokenizer: Path) -> tuple[Transformer, Path, Path]:
    """A Meta directory (no tokenizer) and its megallama conversion with tokenizer.model."""
    cfg = _model_config(32000)
    model = Transformer(cfg, seed=4).eval()
    meta = tmp_path / "meta"
    meta.mkdir()
    torch.save(model.state_dict(), meta / "consolidated.00.pth")
    (meta / "params.json").write_text(json.dumps(cfg.to_meta_params()))
    mega = tmp_path / "mega"
    convert(f"meta:{meta}", f"megallama:{mega}", tokenizer=tokenizer, progress=False)
    assert (mega / "tokenizer.model").is_file()
    return model, meta, mega


@pytest.mark.slow
def test_converted_checkpoint_needs_no_tokenizer_option(tmp_path, capsys,
                                                         llama_tokenizer_path) -> None:
    model, meta, mega = _converted(tmp_path, llama_tokenizer_path)
    tok = Tokenizer(llama_tokenizer_path)
    ids = tok.encode("The quick brown fox")
    expected = tok.decode(ids + generate(model, [ids], 8, eos_id=tok.eos_id)[0]) + "\n"
    gen_args = ["--checkpoint", str(mega), "--prompt", "The quick brown fox",
                "--max-new-tokens", "8"]
    assert generate_cli.main(gen_args) == 0
    assert capsys.readouterr().out == expected
    text = tmp_path / "doc.txt"
    text.write_text(_TEXT)
    eval_args = ["--data", str(text), "--seq-len", "16", "--batch-size", "2", "--device", "cpu"]
    assert evaluate_cli.main(["--checkpoint", str(meta), "--format", "meta", "--tokenizer",
                          str(llama_tokenizer_path), *eval_args]) == 0
    ref = json.loads(capsys.readouterr().out.strip())
    assert evaluate_cli.main(["--checkpoint", str(meta), "--format", "meta", *eval_args]) == 2
    assert "pass --tokenizer" in capsys.readouterr().err
    # two stages under torchrun, the tokenizer found beside the converted weights
    proc, _ = torchrun(2, "megallama.generate", [*gen_args, "--pp", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == expected
    proc, _ = torchrun(2, "megallama.evaluate", ["--checkpoint", str(mega), "--pp", "2",
                                                 *eval_args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["tokens"] == ref["tokens"]
    assert abs(got["val_loss"] - ref["val_loss"]) <= 1e-5 * ref["val_loss"], (got, ref)
