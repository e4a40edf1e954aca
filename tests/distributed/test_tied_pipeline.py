"""Tied input/output embeddings (Llama 3.2, ``model.tie_embeddings``) split over pipeline stages:
the first stage's table and the last stage's copy, their gradients summed over the two (Megatron's
embedding group) before every optimizer's step.

One 2-rank and one 4-rank launch check:
(a) at (tp, pp) = (2, 2), from an HF checkpoint of transformers' tied ``LlamaForCausalLM``
    (and from it resharded to megallama at pp 2): the inference pipeline's logits, the engine's first loss
    equal transformers', and the gradient the optimizer steps with, on both stages, equals
    transformers' ``embed_tokens.weight.grad`` (both uses summed);
(b) two fp32 steps at (tp, pp, dp) = (1, 2, 1), (2, 2, 1) and (1, 2, 2) with DeepSpeed's ZeRO-1,
    ``optim.impl=fused`` and ``optim.impl=distributed`` equal the one-rank run (loss and gradient
    norm each step: the norm counts the weight once; every final weight), and the two copies of
    the table -- weights, fp32 masters and both Adam moments -- are bit-identical after step 2;
    bf16 at (1, 2, 1) stays near it with bit-identical copies for each of the three optimizers;
(c) a checkpoint saved at pp 2 holds ``tok_embeddings.weight`` once (no ``output.weight``), in the
    weights and the optimizer state, and resumes at pp 1 with the same next loss; one saved at
    pp 1 resumes at pp 2 likewise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megallama.checkpoint.state import load_optimizer_state, save_optimizer_state
from megallama.checkpoint.weights import load_model_weights, read_index, save_model_weights
from megallama.config import preset
from megallama.engine import Engine
from megallama.inference.loader import load_for_inference
from megallama.interop.convert import convert
from megallama.model.llama import Transformer
from megallama.parallel import mappings
from megallama.parallel.layers import full_tensor
from megallama.parallel.runtime import init_distributed
from megallama.parallel.topology import Grid, build_topology, kv_replicas_for
from tests.distributed.engine_cases import (
    VOCAB,
    global_batch,
    make_config,
    rank_micro_batches,
    reference_train,
)
from tests.distributed.harness import run_world
from tests.distributed.test_updated_weights import _full_weights

STEPS = 2
SHOW = bool(os.environ.get("MEGALLAMA_PRINT_DIFFS"))  # print the measured differences
LOSS_TOL = 1e-5  # relative, per step (fp32; only the order of sums differs)
BF16_TOL = 1e-2  # bf16 against the fp32 run (measured: 1e-3 on the norm; an unsummed table: 0.2)
WEIGHT_TOL = 1e-4  # max |diff| / max |ref| per parameter (see test_updated_weights.py)
IMPLS = ("deepspeed", "fused", "distributed")


def tied_config(tp: int, pp: int, impl: str):
    cfg = make_config(tp=tp, pp=pp, zero=1 if impl == "deepspeed" else 0)
    cfg.model = preset("tiny_llama3_tied", vocab_size=VOCAB)
    cfg.optim.impl = impl
    return cfg


def _engine(cfg, world: int, init_weights=None):
    p = cfg.parallel
    topo = build_topology(Grid.from_world(world, tp=p.tp, pp=p.pp),
                          kv_replicas_for(cfg.model.n_kv_heads, p.tp))
    return Engine(cfg, topo, torch.device("cpu"), init_weights=init_weights), topo


def _tied_param(engine: Engine) -> torch.nn.Parameter | None:
    """This rank's copy of the tied table (first or last stage), None on other stages."""
    for name, module in engine.local_layers():
        if name == "tok_embeddings":
            return module.weight
    return None


def _check_copies_identical(engine: Engine, what: str) -> None:
    """The first stage's table and the last stage's copy, weights and optimizer state, are equal
    bit for bit (all-gathered over their embedding group)."""
    p = _tied_param(engine)
    if p is None:
        return
    access = engine.optimizer_state
    values = {"weight": p.detach()}
    values.update({k: access.full_state(p, k).detach() for k in ("fp32", "exp_avg", "exp_avg_sq")})
    for key, value in values.items():
        pair = [torch.empty_like(value) for _ in range(2)]
        dist.all_gather(pair, value.contiguous(), group=p.tied_group)
        diff = (pair[0] - pair[1]).abs().max().item()
        assert torch.equal(pair[0], pair[1]), f"{what}: tied copies' {key} differ by {diff:.3e}"


def _check_training(rank: int, world: int, tp: int, pp: int, impl: str, want) -> Engine:
    losses, norms, weights = want
    cfg = tied_config(tp, pp, impl)
    engine, topo = _engine(cfg, world)
    what = f"(tp, pp, dp)=({tp}, {pp}, {topo.grid.dp}) {impl}"
    for step in range(STEPS):
        out = engine.train_step(rank_micro_batches(step, cfg, topo.dp_rank, topo.grid.dp))
        if SHOW and rank == 0:
            print(f"{what} step {step}: loss {out.loss / losses[step] - 1:+.2e} "
                  f"norm {out.grad_norm / norms[step] - 1:+.2e}", flush=True)
        assert abs(out.loss - losses[step]) <= LOSS_TOL * losses[step], \
            f"{what} step {step}: loss {out.loss} != one-rank {losses[step]}"
        assert abs(out.grad_norm - norms[step]) <= LOSS_TOL * norms[step], \
            f"{what} step {step}: grad norm {out.grad_norm} != one-rank {norms[step]}"
    got = _full_weights(engine, cfg)
    worst = max(((got[n] - weights[n]).abs().max().item() / weights[n].abs().max().item(), n)
                for n in got)
    if SHOW:
        print(f"{what} rank {rank}: worst weight {worst[1]} {worst[0]:.2e}", flush=True)
    assert worst[0] <= WEIGHT_TOL, f"{what}: {worst[1]} differs from the one-rank run by {worst[0]:.2e}"
    _check_copies_identical(engine, what)
    return engine


def _check_bf16(world: int, impl: str, want) -> None:
    """bf16 at (1, 2, 1) (DeepSpeed's bf16 optimizer sums the fp32 ``_hp_grad``; the fused and
    distributed optimizers their fp32 buffers): near the fp32 one-rank run, copies bit-identical."""
    cfg = tied_config(1, 2, impl)
    cfg.trainer.precision = "bf16"
    engine, topo = _engine(cfg, world)
    for step in range(STEPS):
        out = engine.train_step(rank_micro_batches(step, cfg, topo.dp_rank, topo.grid.dp))
        for got, ref, what in ((out.loss, want[0][step], "loss"), (out.grad_norm, want[1][step],
                                                                   "grad norm")):
            assert abs(got - ref) <= BF16_TOL * ref, f"bf16 {impl} step {step}: {what} {got} " \
                f"!= fp32 one-rank {ref}"
    _check_copies_identical(engine, f"bf16 (1, 2, 1) {impl}")


# ---- (a) transformers' tied model at (tp, pp) = (2, 2) -------------------------------------------
def _hf_parity(rank: int, world: int, tmp: Path) -> None:
    from tests.test_hf_parity import hf_model_from

    cfg = tied_config(2, 2, "fused")
    model = Transformer(cfg.model, seed=11)
    hf = hf_model_from(model).float()
    src, mg = tmp / "hf", tmp / "mg_pp2"
    if rank == 0:  # transformers writes no lm_head.weight for a tied model; reshard to pp 2
        hf.save_pretrained(src)
        convert(f"hf:{src}", f"megallama:{mg}", tp=2, pp=2, progress=False)
    dist.barrier()
    assert set(read_index(mg)["tensors"]) == set(model.state_dict()), "pp 2 reshard's tensors"
    tokens, labels = global_batch(0, cfg.parallel.global_batch_size)
    logits = hf(tokens).logits
    ref_loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    ref_loss.backward()
    ref_grad = hf.model.embed_tokens.weight.grad

    # (HF's config.json gives multiple_of 64 for the same FFN width: the index's config loads)
    engine, topo = _engine(cfg, world, lambda layers, tp: load_model_weights(layers, tp, mg))
    for where, fmt in ((mg, "megallama"), (src, "hf")):  # the last stage's copy from either
        inference = load_for_inference(where, fmt, tp=2, pp=2, topo=topo)
        with torch.no_grad():
            ours = inference(tokens)
        if topo.is_last_stage:
            full = mappings.gather_from_tp(ours, topo.tp_group)[..., :VOCAB]
            err = ((full - logits.detach()).norm() / logits.norm()).item()
            if SHOW:
                print(f"(2, 2) logits from {fmt} vs transformers: {err:.2e}", flush=True)
            assert err < 1e-5, f"(2, 2) logits from {fmt} differ from transformers' by {err:.2e}"
    p = _tied_param(engine)
    seen = {}
    step = engine.optimizer.step

    def capture(*args, **kwargs):  # the gradient the update reads (after the tied sum)
        step(*args, **kwargs)
        seen["grad"] = full_tensor(p.grad.detach(), p, engine.tp)[:VOCAB].clone()

    engine.optimizer.step = capture
    out = engine.train_step(rank_micro_batches(0, cfg, topo.dp_rank, topo.grid.dp))
    assert abs(out.loss - ref_loss.item()) <= LOSS_TOL * ref_loss.item(), \
        f"(2, 2) loss {out.loss} != transformers' {ref_loss.item()}"
    err = ((seen["grad"] - ref_grad).norm() / ref_grad.norm()).item()
    stage = "first" if topo.is_first_stage else "last"
    if SHOW:
        print(f"(2, 2) rank {rank} loss {out.loss / ref_loss.item() - 1:+.2e}, {stage} stage's "
              f"tied grad {err:.2e}", flush=True)
    assert err < 1e-5, f"(2, 2) {stage} stage's tied gradient differs from transformers' " \
        f"embed_tokens.weight.grad by {err:.2e} (relative)"


# ---- (c) checkpoints across pp -------------------------------------------------------------------
def _save(engine: Engine, topo, cfg, path: Path) -> dict:
    save_model_weights(engine.local_layers(), engine.tp, topo, path, cfg.model)
    save_optimizer_state(engine.local_layers(), engine.tp, topo, path, cfg.model,
                         engine.optimizer_state)
    return {"adam": engine.adam_step(), "sched": engine.scheduler_state(),
            "counters": engine.counters()}


def _resume(engine: Engine, cfg, path: Path, saved: dict) -> None:
    """What a resume loads (training/train_state.py's pieces, in its order)."""
    load_model_weights(engine.local_layers(), engine.tp, path, cfg.model)
    load_optimizer_state(engine.local_layers(), engine.tp, path, cfg.model, engine.optimizer_state)
    engine.set_adam_step(saved["adam"])
    engine.load_scheduler_state(saved["sched"])
    engine.set_counters(**saved["counters"])


def _stored_once(path: Path, dim: int) -> None:
    """The tied table is stored once (its pieces hold vocab x dim elements), no head."""
    for d in (path, *(path / "optim" / k for k in ("fp32", "exp_avg", "exp_avg_sq"))):
        index = json.loads(next(f for f in d.iterdir() if f.name.endswith("index.json")).read_text())
        tensors = index["tensors"]
        assert "output.weight" not in tensors, f"{d}: output.weight saved"
        pieces = tensors["tok_embeddings.weight"]["pieces"]
        held = sum(x["length"] * dim if "length" in x else
                   (x["box"][0][1] - x["box"][0][0]) * (x["box"][1][1] - x["box"][1][0])
                   for x in pieces)
        assert held == VOCAB * dim, f"{d}: tok_embeddings.weight stored with {held} elements"


def _steps(engine: Engine, cfg, topo, first: int, n: int = 2) -> list[float]:
    return [engine.train_step(rank_micro_batches(s, cfg, topo.dp_rank, topo.grid.dp)).loss
            for s in range(first, first + n)]


def _hop(rank: int, world: int, src: Engine, src_cfg, dst_cfg, tmp: Path, first: int) -> Engine:
    """Save ``src`` after ``first`` steps and train it 2 more; a run resumed from the save at
    ``dst_cfg``'s layout must give the same 2 losses (the second one shows the loaded optimizer
    state and the tied sum survived an update). Returns the resumed engine."""
    what = f"pp {src_cfg.parallel.pp} -> pp {dst_cfg.parallel.pp}"
    path = tmp / f"{what.replace(' ', '')}_{first}"
    saved = _save(src, src.topo, src_cfg, path)
    if rank == 0:
        _stored_once(path, src_cfg.model.dim)
    want = _steps(src, src_cfg, src.topo, first)
    dst, topo = _engine(dst_cfg, world)
    _resume(dst, dst_cfg, path, saved)
    got = _steps(dst, dst_cfg, topo, first)
    if SHOW:
        print(f"{what}: steps {first + 1}, {first + 2} loss "
              f"{', '.join(f'{g / w - 1:+.2e}' for g, w in zip(got, want, strict=True))}",
              flush=True)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert abs(g - w) <= LOSS_TOL * w, f"{what}: step {first + i + 1} loss {g} != {w}"
    if dst_cfg.parallel.pp > 1:
        _check_copies_identical(dst, f"resumed at pp {dst_cfg.parallel.pp}, 2 steps later")
    return dst


def _cross_pp(rank: int, world: int, pp2: Engine, tmp: Path) -> None:
    """``pp2``: the (2, 2, 1) DeepSpeed run after 2 steps. pp 2 -> (2, 1, 2) fused -> pp 2 again
    at (1, 2, 2) distributed: each resumed run's next 2 losses equal the saved run's."""
    pp1 = _hop(rank, world, pp2, tied_config(2, 2, "deepspeed"), tied_config(2, 1, "fused"),
               tmp, 2)
    _hop(rank, world, pp1, tied_config(2, 1, "fused"), tied_config(1, 2, "distributed"), tmp, 4)


def _worker(rank: int, world: int, tmp: str) -> None:
    init_distributed(torch.device("cpu"))
    tmp = Path(tmp)
    want = reference_train(tied_config(1, 1, "deepspeed"), STEPS)  # one rank, one weight
    if world == 2:
        for impl in IMPLS:
            _check_training(rank, world, 1, 2, impl, want)
            _check_bf16(world, impl, want)
        return
    _hf_parity(rank, world, tmp)
    for tp, pp in ((2, 2), (1, 2)):
        for impl in IMPLS:
            engine = _check_training(rank, world, tp, pp, impl, want)
            if (tp, impl) == (2, "deepspeed"):  # before another pipeline engine is built
                _cross_pp(rank, world, engine, tmp)
            del engine


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_tied_embeddings_over_pipeline_stages(world, tmp_path):
    run_world(world, _worker, str(tmp_path))
