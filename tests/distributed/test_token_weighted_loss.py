"""The loss of a step is the mean over every target token of the global batch, at every layout.

Masked fine-tuning data puts very different numbers of target tokens in each micro-batch and DP
rank (here: one row with none at all, others from 5% to 100%), and packed documents restrict
attention to each document. Over 4 fp32 steps with clipping active the engine must give the
losses and gradient norms of a plain single-process run that computes torch's cross-entropy over
the whole global batch at once -- the definition, not a mean of per-micro-batch means -- within
1e-5 relative, at (tp, pp, dp) = (1,1,1), (2,2,1) with SP, (1,2,2), (2,1,2). The same holds for
unmasked pretraining data with document masking. Before training, the validation loss of packed
samples at each layout equals the loss of each document run on its own (pp 2 included).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megallama.engine import Engine
from megallama.model.llama import Transformer
from megallama.parallel import mappings
from megallama.parallel.runtime import init_distributed
from megallama.parallel.topology import Grid, build_topology, kv_replicas_for
from tests.distributed.engine_cases import SEQ, VOCAB, make_config, reference_optimizer
from tests.distributed.harness import run_world

TOL = 1e-5
STEPS = 4


def global_batch(step: int, size: int, masked: bool) -> tuple[torch.Tensor, ...]:
    """tokens, labels and segments [size, SEQ]: 1-4 documents per row; with ``masked``, each row
    keeps a different share of its targets (row 1: none)."""
    g = torch.Generator().manual_seed(3000 + step)
    seq = torch.randint(0, VOCAB, (size, SEQ + 1), generator=g)
    labels = seq[:, 1:].clone()
    starts = torch.rand(size, SEQ + 1, generator=g) < 0.15
    starts[:, 0] = False
    segments = starts.long().cumsum(-1)
    labels[segments[:, 1:] != segments[:, :-1]] = -100  # a document's first token: no target
    if masked:
        share = torch.linspace(0.05, 1.0, size)[torch.randperm(size, generator=g)]
        labels[torch.rand(size, SEQ, generator=g) >= share[:, None]] = -100
        labels[1] = -100
    return seq[:, :-1], labels, segments[:, :-1]


def rank_micro_batches(step, cfg, dp_rank, dp, masked):
    batch = global_batch(step, cfg.parallel.global_batch_size, masked)
    per_rank, m = cfg.parallel.global_batch_size // dp, cfg.parallel.micro_batch_size
    lo = dp_rank * per_rank
    return [tuple(t[i:i + m] for t in batch) for i in range(lo, lo + per_rank, m)]


def reference(cfg, masked: bool) -> tuple[list[float], list[float]]:
    """Full-batch single-process run: torch's mean cross-entropy over all target tokens."""
    model = Transformer(cfg.model, seed=cfg.trainer.seed)
    opt, sched = reference_optimizer(model, cfg)
    losses, norms = [], []
    for step in range(STEPS):
        tokens, labels, segments = global_batch(step, cfg.parallel.global_batch_size, masked)
        opt.zero_grad()
        logits = model(tokens, segments=segments)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip).item())
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses, norms


@torch.no_grad()
def separate_documents_loss(cfg, batch) -> float:
    """Loss of the packed rows computed one document at a time, each alone from position 0."""
    model = Transformer(cfg.model, seed=cfg.trainer.seed)
    tokens, labels, segments = batch
    total, count = 0.0, 0
    for row in range(tokens.size(0)):
        for seg in segments[row].unique():
            pick = segments[row] == seg
            doc_tokens, doc_labels = tokens[row, pick][None], labels[row, pick][None]
            logits = model(doc_tokens)
            total += F.cross_entropy(logits.flatten(0, 1), doc_labels.flatten(),
                                     ignore_index=-100, reduction="sum").item()
            count += int((doc_labels != -100).sum())
    return total / count


def _worker(rank: int, world: int, layouts) -> None:
    init_distributed(torch.device("cpu"))
    for tp, pp, sp, micro in layouts:
        cfg = make_config(tp=tp, pp=pp, sp=sp, micro=micro)
        cfg.trainer.steps = STEPS
        grid = Grid.from_world(world, tp=tp, pp=pp)
        topo = build_topology(grid, kv_replicas_for(cfg.model.n_kv_heads, tp))
        engine = Engine(cfg, topo, torch.device("cpu"))
        what = f"tp={tp} pp={pp} dp={grid.dp} sp={sp} micro={micro}"
        # packed documents before any step: the model's loss equals each document's alone
        packed = global_batch(99, cfg.parallel.global_batch_size, masked=False)
        want = separate_documents_loss(cfg, packed)
        got = engine.eval_loss(rank_micro_batches(99, cfg, topo.dp_rank, grid.dp, False))
        assert abs(got - want) <= TOL * want, f"{what}: packed loss {got} != alone {want}"
        for masked in (True, False):
            ref_losses, ref_norms = reference(cfg, masked)
            assert max(ref_norms) > cfg.optim.grad_clip, "clipping must be active in this test"
            for step in range(STEPS):
                out = engine.train_step(rank_micro_batches(step, cfg, topo.dp_rank, grid.dp, masked))
                case = f"{what} masked={masked} step {step}"
                assert abs(out.loss - ref_losses[step]) <= TOL * ref_losses[step], (
                    f"{case}: loss {out.loss} != reference {ref_losses[step]}")
                assert abs(out.grad_norm - ref_norms[step]) <= TOL * ref_norms[step], (
                    f"{case}: grad norm {out.grad_norm} != reference {ref_norms[step]}")
            engine = Engine(cfg, topo, torch.device("cpu"))  # fresh weights for the next data


@pytest.mark.slow
@pytest.mark.parametrize("world,layouts", [
    (1, [(1, 1, False, 1), (1, 1, False, 4)]),
    (4, [(2, 2, True, 2), (2, 2, False, 2), (1, 2, False, 1), (2, 1, False, 2)]),
], ids=["world1", "world4"])
def test_token_weighted_loss_matches_full_batch(world, layouts):
    run_world(world, _worker, layouts)


def _tp_logits_worker(rank: int, world: int) -> None:
    """tp 2 (with and without SP): the logits of each packed document equal its logits alone
    (computed without SP: a lone document's length need not divide over the ranks)."""
    init_distributed(torch.device("cpu"))
    tokens, _, segments = global_batch(7, 2, masked=False)
    models = {}
    for sp in (False, True):
        cfg = make_config(tp=2, sp=sp)
        topo = build_topology(Grid.from_world(world, tp=2), kv_replicas_for(cfg.model.n_kv_heads, 2))
        tp = topo.tensor_parallel(cfg.model.n_kv_heads, sp)
        models[sp] = Transformer(cfg.model, tp, seed=cfg.trainer.seed)
    group = models[False].tp.group
    with torch.no_grad():
        for sp, model in models.items():
            packed = mappings.gather_from_tp(model(tokens, segments=segments), group)
            for row in range(tokens.size(0)):
                for seg in segments[row].unique():
                    pick = segments[row] == seg
                    alone = mappings.gather_from_tp(models[False](tokens[row, pick][None]), group)
                    diff = (packed[row, pick] - alone[0]).abs().max().item()
                    assert diff <= 1e-5, f"sp={sp} row {row} document {seg}: logits differ by {diff}"


@pytest.mark.slow
def test_packed_logits_equal_documents_alone_at_tp2():
    run_world(2, _tp_logits_worker)
