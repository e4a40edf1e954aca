"""Every expected failure of ``megallama-lm-eval`` (``python -m megallama.lm_eval``) is one line.

One row per case: ``--model_args`` keys that are unknown, repeated or missing, values out of range
or of the wrong type, a layout that does not fit the model or the world, lm-eval's own
``--device`` / ``--batch_size``. Each row runs the command line in this process (lm-eval's own
parser and evaluator, its task index limited to the local task) and checks exit status 2, a last
stderr line ``megallama-lm-eval: error: ...`` naming the key or option, no traceback, and the
words of a misleading message of the past absent (``trainer.device``, ``parallel.tp``,
``--nproc-per-node 0``). No row loads weights: every check runs before the checkpoint is read.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tests.conftest import require_module

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only (before huggingface_hub loads)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
require_module("lm_eval")

import lm_eval.__main__  # noqa: E402
import lm_eval.tasks  # noqa: E402

from megallama import lm_eval as command  # noqa: E402
from megallama.checkpoint.weights import save_model_weights  # noqa: E402
from megallama.config import preset  # noqa: E402
from megallama.config.grid import Grid  # noqa: E402
from megallama.model.llama import Transformer  # noqa: E402
from megallama.parallel.topology import Topology  # noqa: E402

PROG = "megallama-lm-eval"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """A megallama checkpoint of 4 heads over 2 KV heads, 2 blocks, a context of 64 (no
    tokenizer: no row gets that far), and a local multiple-choice task."""
    root = tmp_path_factory.mktemp("lm_eval_cli")
    cfg = preset("tiny_gqa", vocab_size=32000, n_layers=2, dim=32, n_heads=4, n_kv_heads=2,
                 max_seq_len=64)
    model = Transformer(cfg, seed=3).eval()
    save_model_weights(model.named_layers(), model.tp, Topology(grid=Grid(), rank=0),
                       root / "ckpt", model.cfg)
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "mc.jsonl").write_text(json.dumps({"q": "Is water wet?", "choices": ["yes", "no"],
                                                "answer": 0}) + "\n")
    (tasks / "mc.yaml").write_text(json.dumps({
        "task": "cli_mc", "dataset_path": "json", "test_split": "test",
        "dataset_kwargs": {"data_files": {"test": str(tasks / "mc.jsonl")}},
        "output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]}))
    return {"ckpt": str(root / "ckpt"), "tasks": str(tasks), "absent": str(root / "absent")}


@dataclass(frozen=True)
class Case:
    """``--model_args model_args`` plus ``argv`` must fail with a last line holding every
    string of ``expect`` and none of ``forbid``; ``setup`` prepares the process."""

    id: str
    model_args: str
    argv: tuple[str, ...] = ("--device", "cpu")
    expect: tuple[str, ...] = ()
    forbid: tuple[str, ...] = ()
    setup: Callable[[pytest.MonkeyPatch], None] | None = field(default=None, compare=False)


def _no_gpu(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(torch.cuda, "is_available", lambda: False)


def _never_started(device: torch.device) -> None:
    raise AssertionError("torch.distributed was started before the arguments were checked")


def _world(n: int) -> Callable[[pytest.MonkeyPatch], None]:
    """What torchrun tells each of n ranks; starting torch.distributed fails the row at once
    (alone, this process would wait for n - 1 ranks that never come)."""
    def setup(mp: pytest.MonkeyPatch) -> None:
        mp.setenv("WORLD_SIZE", str(n))
        mp.setenv("RANK", "0")
        mp.setattr("megallama.inference.loader.init_distributed", _never_started)
    return setup


CK = "checkpoint={ckpt}"
CASES = [
    # keys: unknown (was a TypeError traceback), missing, given twice
    Case("unknown-key", f"{CK},bogus=1",
         expect=("--model_args: unknown key 'bogus'", "the keys are checkpoint, format, tp")),
    Case("no-checkpoint", "tp=1", expect=("--model_args needs checkpoint=DIR",)),
    Case("device-in-model-args", f"{CK},device=cpu",
         expect=("--model_args device=...: give it once, as lm-eval's --device",)),
    # values (max_length=-1 was accepted and scores printed)
    Case("max-length-negative", f"{CK},max_length=-1",
         expect=("--model_args max_length=-1: must be >= 1", "the model's context, 64")),
    Case("max-length-zero", f"{CK},max_length=0", expect=("--model_args max_length=0: must be",)),
    Case("max-length-over-context", f"{CK},max_length=65",
         expect=("--model_args max_length=65 exceeds the model's context of 64",)),
    Case("max-length-not-int", f"{CK},max_length=long",
         expect=("--model_args max_length='long': expected an integer >= 1",)),
    Case("max-gen-toks-zero", f"{CK},max_gen_toks=0",
         expect=("--model_args max_gen_toks=0: must be >= 1",)),
    Case("dtype-unknown", f"{CK},dtype=fp16", expect=("--model_args dtype='fp16'", "bf16")),
    Case("format-unknown", f"{CK},format=gguf",
         expect=("--model_args format='gguf': expected one of megallama, meta, hf",)),
    Case("add-bos-not-bool", f"{CK},add_bos_token=maybe",
         expect=("--model_args add_bos_token='maybe': expected true or false",)),
    Case("checkpoint-missing", "checkpoint={absent}", expect=("{absent}", "no such checkpoint")),
    # layout: tp=0 was told to launch "torchrun --nproc-per-node 0"; under torchrun the
    # message named the trainer's parallel.tp
    Case("tp-zero", f"{CK},tp=0", expect=("--model_args tp=0: must be >= 1",),
         forbid=("--nproc-per-node 0",)),
    Case("pp-not-int", f"{CK},pp=two", expect=("--model_args pp='two': expected an integer",)),
    Case("tp-not-world", f"{CK},tp=2",
         expect=("--model_args tp=2 * pp=1 = 2 does not equal the world size 1",
                 "torchrun --nproc-per-node 2")),
    Case("pp-above-layers", f"{CK},pp=3",
         expect=("--model_args pp=3: more pipeline stages than the model's n_layers=2",)),
    Case("tp-not-dividing-heads-torchrun", f"{CK},tp=3", setup=_world(3),
         expect=("--model_args tp=3 does not divide n_heads=4", "choose another tp"),
         forbid=("parallel.tp",)),
    # lm-eval's own options: without --device it is cuda:0 (was "use trainer.device=cpu")
    Case("device-default-without-gpu", CK, argv=(), setup=_no_gpu,
         expect=("--device cuda:0: no CUDA device is visible", "pass --device cpu"),
         forbid=("trainer.device",)),
    Case("device-mps", CK, argv=("--device", "mps"),
         expect=("--device mps: the megallama model runs on cuda or cpu",)),
    Case("batch-size-auto", CK, argv=("--device", "cpu", "--batch_size", "auto"),
         expect=("--batch_size auto", "no 'auto'")),
]


@pytest.fixture
def local_tasks_only(monkeypatch) -> None:
    """lm-eval indexes its ~14,000 bundled task files before building the model (5 s a run):
    the rows need only the local task. Its command line also binds a log handler to the
    stderr of the first run for good, which pytest closes after that test: left out."""
    monkeypatch.setattr(lm_eval.tasks, "TaskManager",
                        functools.partial(lm_eval.tasks.TaskManager, include_defaults=False))
    monkeypatch.setattr(lm_eval.__main__, "setup_logging", lambda *args, **kwargs: None)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_expected_failure_is_one_line(case: Case, inputs, local_tasks_only, capsys,
                                      monkeypatch) -> None:
    monkeypatch.delenv("MEGALLAMA_DEBUG", raising=False)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    if case.setup is not None:
        case.setup(monkeypatch)
    model_args = case.model_args.format(**inputs)
    monkeypatch.setattr(sys, "argv", [PROG, "--model", "megallama", "--model_args", model_args,
                                      "--tasks", "cli_mc", "--include_path", inputs["tasks"],
                                      *case.argv])
    rc = command.main()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err, err[:3000]
    assert lines and lines[-1].startswith(f"{PROG}: error: "), err[-3000:]
    for expected in case.expect:
        assert expected.format(**inputs) in lines[-1], lines[-1]
    for forbidden in case.forbid:
        assert forbidden not in lines[-1], lines[-1]
    assert not Path(inputs["absent"]).exists()
