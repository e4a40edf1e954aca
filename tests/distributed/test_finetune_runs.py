"""What a fine-tuning run reports and skips, checked inside real runs (gloo, in-process Trainers):

- validation covers the validation set once (``trainer.eval_iters=null``), reports its windows
  and target tokens (counted here from the windows), starts with the base model's number
  (``trainer.eval_at_start``), and equals ``megallama-evaluate``'s score of the saved checkpoint
  with the same packing and loss mask (documents packing, masked answers, a short last batch);
- a global batch without any target token takes no optimizer step: weights bit for bit
  unchanged (with weight decay and a learning rate that would move them), counted as skipped;
- ``data_tokens_per_s`` counts the data, ``tokens_per_s`` every computed position: their ratio
  is the windows' non-padding fraction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megallama.config import preset
from megallama.config.grid import Grid
from megallama.config.train_config import TrainConfig
from megallama.data.dataset import PackedDataset
from megallama.data.indexed import IndexedWriter
from megallama.data.packing import collate_windows, input_tokens, windows_for
from megallama.inference.evaluation import EvalRequest, evaluate, plan_evaluation
from megallama.parallel.runtime import init_distributed
from megallama.training.loop import Trainer
from tests.distributed.cli import VOCAB
from tests.distributed.harness import run_world
from tests.distributed.test_updated_weights import _full_weights

pytestmark = pytest.mark.slow
SEQ = 24


def write_chat(prefix: Path, n: int, seed: int, answers: bool = True) -> None:
    """Dialogs [BOS, 7, prompt..., 8, answer..., EOS]; the mask marks answer and EOS (or, with
    ``answers=False``, nothing: no token is a target)."""
    rng = np.random.default_rng(seed)
    docs, masks = [], []
    for _ in range(n):
        prompt = rng.integers(10, 30, rng.integers(2, 9))
        answer = (prompt[-1] - 10 + np.arange(1, 5)) % 20 + 10
        docs.append(np.array([1, 7, *prompt, 8, *answer, 2]))
        masks.append(np.array([0] * (len(prompt) + 3) + [int(answers)] * (len(answer) + 1)))
    with IndexedWriter(prefix, VOCAB) as w:
        w.add_documents(np.concatenate(docs), [len(d) for d in docs], np.concatenate(masks))


def make_config(root: Path, out: Path, pp: int, train: str = "train") -> TrainConfig:
    cfg = TrainConfig()
    cfg.model = preset("tiny_gqa", vocab_size=VOCAB, n_layers=2)
    cfg.parallel.pp, cfg.parallel.zero_stage = pp, 1
    cfg.parallel.micro_batch_size, cfg.parallel.global_batch_size = 2, 4
    cfg.optim.impl, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay = \
        "deepspeed", 1e-2, 0, 0.1
    cfg.data.train, cfg.data.valid = [str(root / train)], [str(root / "valid")]
    cfg.data.seq_len, cfg.data.packing = SEQ, "documents"
    t = cfg.trainer
    t.steps, t.seed, t.device, t.output_dir, t.progress = 3, 3, "cpu", str(out), False
    t.eval_interval, t.eval_iters, t.eval_at_start, t.log_interval = 3, None, True, 3
    return cfg


def _validation_and_evaluate(rank: int, world: int, root: Path, tmp: Path) -> None:
    init_distributed(torch.device("cpu"))
    valid = windows_for(PackedDataset(str(root / "valid"), SEQ), "documents", True)
    targets = sum(int((collate_windows([valid[i]])[1] != -100).sum()) for i in range(len(valid)))
    assert len(valid) % 4, "the set must end in a short global batch"
    for pp in (1, 2):  # dp 2, then pp 2
        cfg = make_config(root, tmp / f"pp{pp}", pp)
        trainer = Trainer(cfg, Grid.from_world(world, pp=pp), torch.device("cpu"))
        logged: list = []
        trainer.writer.scalars = lambda step, values, log=logged: log.append((step, values))
        final = trainer.train()
        evals = [(s, v) for s, v in logged if "valid/loss" in v]
        assert [s for s, _ in evals] == [0, 3], evals  # eval_at_start, then the last step
        for _, v in evals:
            assert (v["valid/windows"], v["valid/target_tokens"]) == (len(valid), targets), v
        assert evals[0][1]["valid/loss"] != evals[1][1]["valid/loss"]
        # megallama-evaluate on the saved checkpoint, the run's packing and mask, at dp = world
        plan = plan_evaluation(EvalRequest(checkpoint=Path(final["checkpoint"]),
                                           data=[str(root / "valid")], seq_len=SEQ,
                                           batch_size=4, micro_batch_size=2), world)
        assert (plan.packing, plan.loss_mask) == ("documents", True)
        scored = evaluate(plan)
        assert (scored["windows"], scored["tokens"]) == (len(valid), targets), scored
        assert scored["val_loss"] == pytest.approx(final["valid_loss"], rel=1e-6, abs=0), \
            (pp, scored, final["valid_loss"])
        del trainer


def _no_target_and_data_tokens(rank: int, world: int, root: Path, tmp: Path) -> None:
    init_distributed(torch.device("cpu"))
    cfg = make_config(root, tmp / "empty", 1, train="no_answers")
    cfg.trainer.eval_interval, cfg.trainer.log_interval, cfg.trainer.steps = 0, 1, 2
    cfg.trainer.save_final = False  # a save creates DeepSpeed's Adam state (a zero step)
    trainer = Trainer(cfg, Grid.from_world(world), torch.device("cpu"))
    before, adam_before = _full_weights(trainer.engine, cfg), trainer.engine.adam_step()
    final = trainer.train()
    after = _full_weights(trainer.engine, cfg)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert not changed, f"a global batch without targets moved {changed[:3]}"
    assert trainer.engine.skipped_steps == 2 and trainer.engine.adam_step() == adam_before
    # computed vs data tokens: the first global batch of a run is the sampler's first 4 windows
    cfg = make_config(root, tmp / "tokens", 1)
    cfg.trainer.eval_interval, cfg.trainer.log_interval, cfg.trainer.steps = 0, 1, 1
    trainer = Trainer(cfg, Grid.from_world(world), torch.device("cpu"))
    sampler_order = trainer.source.sampler.stream(0, 4).tolist()
    final = trainer.train()
    windows = [trainer.source.dataset[i] for i in sampler_order]
    ratio = input_tokens(windows) / (4 * SEQ)
    assert ratio < 0.95, "the test data must have padding"
    assert final["data_tokens_per_s"] / final["tokens_per_s"] == pytest.approx(ratio, rel=1e-9)
    dist.barrier()


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chat_runs")
    write_chat(root / "train", 120, 1)
    write_chat(root / "valid", 30, 2)
    write_chat(root / "no_answers", 60, 3, answers=False)
    return root


def test_validation_once_at_start_and_equal_to_evaluate(chat, tmp_path):
    run_world(2, _validation_and_evaluate, chat, tmp_path)


def test_batch_without_targets_is_skipped_and_data_tokens(chat, tmp_path):
    run_world(2, _no_target_and_data_tokens, chat, tmp_path)
