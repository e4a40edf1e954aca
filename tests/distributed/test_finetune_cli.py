"""Fine-tuning end to end under torchrun: a pretraining checkpoint starts a run on masked chat-like
data (``trainer.init_from``: its weights, a fresh optimizer), packed by document; the loss is
computed only on the answers and falls; the logged validation loss equals the masked loss of the
saved weights computed here in one process with torch's cross-entropy; a restart resumes the
fine-tuning run's own checkpoint, not the initial weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megallama.data.dataset import PackedDataset
from megallama.data.indexed import IndexedWriter
from megallama.data.packing import collate_windows, windows_for
from tests.distributed.cli import VOCAB, overrides, read_scalars, torchrun
from tests.distributed.test_train_cli import checkpoint_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory) -> Path:
    """Dialogs [BOS, 7, prompt..., 8, answer..., EOS]: random prompts, answers that count on from
    the prompt's last token (a rule only the answers teach); the mask marks answer and EOS."""
    root = tmp_path_factory.mktemp("chat")
    rng = np.random.default_rng(1)
    for split, n in (("train", 600), ("val", 80)):
        docs, masks = [], []
        for _ in range(n):
            prompt = rng.integers(10, 30, rng.integers(2, 6))
            answer = (prompt[-1] - 10 + np.arange(1, 5)) % 20 + 10
            docs.append(np.array([1, 7, *prompt, 8, *answer, 2]))
            masks.append(np.array([0] * (len(prompt) + 3) + [1] * (len(answer) + 1)))
        with IndexedWriter(root / split, VOCAB) as w:
            w.add_documents(np.concatenate(docs), [len(d) for d in docs], np.concatenate(masks))
    return root


def test_finetune_from_checkpoint_on_masked_documents(token_files, chat_files, tmp_path):
    base = tmp_path / "base"
    proc, _ = torchrun(1, "megallama.train", overrides(token_files, base, "trainer.steps=6",
                                                       "trainer.eval_interval=0"))
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "sft"
    sft = [f"data.train=[{chat_files / 'train'}]", f"data.valid=[{chat_files / 'val'}]",
           "data.packing=documents", f"trainer.init_from={base}", "parallel.pp=2",
           "trainer.eval_interval=30", "optim.warmup_steps=2", "optim.lr=1e-2"]
    proc, _ = torchrun(2, "megallama.train", overrides(token_files, out, "trainer.steps=30", *sft))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"initialised from the weights of {base / 'checkpoints' / 'step_00000006'}" in proc.stdout
    state = json.loads((out / "checkpoints" / "step_00000030" / "trainer_state.json").read_text())
    assert state["step"] == 30 and state["adam_step"] == 30  # a fresh optimizer, not 6 + 30
    scalars = read_scalars(out / "tensorboard")
    losses = scalars["train/loss"]
    assert losses[-1] < losses[0] - 1.0, f"masked loss did not fall: {losses}"

    # the logged validation loss: every answer token of the first 2 global batches of packed
    # validation windows, through the saved weights, one process, torch's cross-entropy
    model = checkpoint_model(out / "checkpoints" / "step_00000030")
    windows = windows_for(PackedDataset(chat_files / "val", 32), "documents", use_mask=True)
    tokens, labels, segments = collate_windows([windows[i] for i in range(2 * 8)])
    assert (labels != -100).float().mean() < 0.6  # prompts and padding carry no loss
    with torch.no_grad():
        logits = model(tokens, segments=segments)
    want = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100).item()
    assert abs(scalars["valid/loss"][-1] - want) < 1e-4 * want, (scalars["valid/loss"], want)

    proc, _ = torchrun(2, "megallama.train", overrides(token_files, out, "trainer.steps=31", *sft))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "initialised from" not in proc.stdout
