"""megallama's fused master-weight AdamW against torch's AdamW (the oracle), on one process.

The multi-rank behaviour (DP mean, TP/PP-aware norm, accumulation under the real Engine) is in
tests/distributed/test_engine_parity.py (fp32, exact) and test_fused_optimizer.py (bf16).
The Triton kernels against the torch reference (on CPU under Triton's interpreter, and compiled on
a GPU) are in tests/test_optim_kernels.py.
"""

from __future__ import annotations

import pytest
import torch

from megallama.optim.adamw_kernel import (
    join_fp32,
    split_fp32,
)
from megallama.optim.fused_adamw import MasterWeightAdamW
from megallama.parallel.topology import Grid, build_topology

LR, BETAS, EPS, WD = 1e-2, (0.9, 0.95), 1e-5, 0.1


def _params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 8), (8,), (33, 5)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _groups(params):
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": WD},
            {"params": [p for p in params if p.ndim == 1], "weight_decay": 0.0}]


def _fused(params, clip=0.0):
    return MasterWeightAdamW(_groups(params), lr=LR, betas=BETAS, eps=EPS, max_grad_norm=clip,
                             topo=build_topology(Grid.from_world(1)), gas=1)


def _grads(step: int, params, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(p.shape, generator=g) * scale).to(p.dtype) for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch_adamw_on_the_master(dtype):
    """bf16 params: the fp32 master follows torch AdamW run on fp32 copies fed the same (bf16)
    gradients bit for bit, and the bf16 weight is the master rounded to nearest (ties away from
    zero, see split_fp32); fp32 params: identical."""
    params = _params(dtype)
    ref = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    opt = _fused(params)
    ref_opt = torch.optim.AdamW(_groups(ref), lr=LR, betas=BETAS, eps=EPS, foreach=False)
    for step in range(4):
        for p, r, g in zip(params, ref, _grads(step, params), strict=True):
            p.grad, r.grad = g, g.float()
        opt.step()
        ref_opt.step()
    for p, r in zip(params, ref, strict=True):
        assert torch.equal(opt.full_state(p, "fp32"), r.detach())
        want = r.detach() if dtype == torch.float32 else split_fp32(r.detach())[0]
        assert torch.equal(p.detach(), want)
        assert torch.equal(opt.full_state(p, "exp_avg"), ref_opt.state[r]["exp_avg"])
        assert torch.equal(opt.full_state(p, "exp_avg_sq"), ref_opt.state[r]["exp_avg_sq"])
    assert int(opt.step_count) == 4


def test_clipping_and_norm_match_torch():
    params = _params(torch.float32)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = _fused(params, clip=0.5)
    ref_opt = torch.optim.AdamW(_groups(ref), lr=LR, betas=BETAS, eps=EPS, foreach=False)
    for step in range(3):
        for p, r, g in zip(params, ref, _grads(step, params, scale=3.0), strict=True):
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        norm = torch.nn.utils.clip_grad_norm_(ref, 0.5).item()
        ref_opt.step()
        assert opt._global_grad_norm == pytest.approx(norm, rel=1e-6)
        assert norm > 0.5  # clipping was active
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)


def test_nonfinite_step_changes_nothing():
    params = _params(torch.bfloat16)
    opt = _fused(params, clip=1.0)
    for p, g in zip(params, _grads(0, params), strict=True):
        p.grad = g
    opt.step()
    before = {k: [opt.full_state(p, k).clone() for p in params] for k in ("fp32", "exp_avg")}
    weights = [p.detach().clone() for p in params]
    for p, g in zip(params, _grads(1, params), strict=True):
        p.grad = g
    params[1].grad[3] = float("inf")
    opt.step()
    assert opt.overflow and opt._global_grad_norm == float("inf")
    assert int(opt.step_count) == 1
    for k, values in before.items():
        for p, v in zip(params, values, strict=True):
            assert torch.equal(opt.full_state(p, k), v)
    assert all(torch.equal(p.detach(), w) for p, w in zip(params, weights, strict=True))


def test_accumulation_sums_bf16_gradients_in_fp32():
    """With several micro-batches per step each bf16 gradient is moved into an fp32 buffer by a
    hook, so many small micro-batch gradients do not lose bits to bf16 sums."""
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = MasterWeightAdamW([{"params": [w], "weight_decay": 0.0}], lr=LR, betas=BETAS, eps=EPS,
                            max_grad_norm=0.0, topo=build_topology(Grid.from_world(1)),
                            gas=256)
    for _ in range(256):  # a bf16 running sum of 2^-9 steps stops at 0.25 (half an ulp)
        (w.float() * (1.0 / 512)).sum().backward()
        assert w.grad is None
    main = opt.state[w]["main_grad"]
    assert torch.allclose(main, torch.full((4,), 0.5))
    opt.step()
    assert torch.count_nonzero(main) == 0  # zeroed for the next step


def test_checkpoint_state_round_trip():
    """What a checkpoint stores (master, both moments through ``full_state``; the Adam step as
    the engine's ``set_adam_step`` restores it) loads into a fresh optimizer exactly, and the
    restored optimizer then steps bit for bit like the original (bias correction included)."""
    params = _params(torch.bfloat16)
    opt = _fused(params)
    for step in range(2):
        for p, g in zip(params, _grads(step, params), strict=True):
            p.grad = g
        opt.step()
    fresh = _params(torch.bfloat16, seed=7)
    opt2 = _fused(fresh)
    keys = ("fp32", "exp_avg", "exp_avg_sq")
    for p, q in zip(params, fresh, strict=True):
        for key in keys:
            assert not torch.equal(opt2.full_state(q, key), opt.full_state(p, key)), key
            opt2.set_full_state(q, key, opt.full_state(p, key))
    for state in opt2.state.values():  # as Engine.set_adam_step does
        state["step"].fill_(float(opt.state[params[0]]["step"]))
    for p, q in zip(params, fresh, strict=True):
        assert torch.equal(q.detach(), p.detach())  # the bf16 weight follows the master
        for key in keys:
            assert torch.equal(opt2.full_state(q, key), opt.full_state(p, key)), \
                f"{key} not restored"
    assert int(opt2.step_count) == int(opt.step_count) == 2
    assert {int(s["step"]) for s in opt2.state.values()} == {2}
    for opt_, ps in ((opt, params), (opt2, fresh)):  # one more step from the restored state
        for p, g in zip(ps, _grads(2, ps), strict=True):
            p.grad = g
        opt_.step()
    for p, q in zip(params, fresh, strict=True):
        assert torch.equal(q.detach(), p.detach())
        for key in keys:
            assert torch.equal(opt2.full_state(q, key), opt.full_state(p, key)), \
                f"{key} differs one step after the restore"


def test_split_fp32_is_exact_and_rounds_to_nearest():
    x = torch.randn(100_000) * torch.logspace(-30, 30, 100_000)
    x[:4] = torch.tensor([0.0, -0.0, 1.0, -3.0e38])
    hi, lo = split_fp32(x)
    assert torch.equal(join_fp32(hi, lo).view(torch.int32), x.view(torch.int32))
    ties = (x.view(torch.int32) & 0xFFFF) == 0x8000
    rne = x.to(torch.bfloat16)
    assert torch.equal(hi[~ties], rne[~ties])
    tie = torch.tensor([1.0 + 2**-8])  # exactly half a bf16 ulp above 1
    assert split_fp32(tie)[0].item() == 1.0 + 2**-7  # away from zero (round-to-even gives 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs a CUDA GPU")
def test_optimizer_on_gpu_matches_cpu_reference():
    """The whole optimizer (Triton norm, clipping on the device, fused updates, skipped NaN
    step) on the GPU against the same optimizer's torch reference path on CPU."""
    pytest.importorskip("triton")
    cpu = _params(torch.bfloat16)
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    opt_cpu, opt_gpu = _fused(cpu, clip=0.5), _fused(gpu, clip=0.5)
    assert opt_gpu.use_kernel and not opt_cpu.use_kernel
    for step in range(4):
        grads = _grads(step, cpu, scale=3.0)
        if step == 2:
            grads[0][0, 0] = float("nan")
        for c, g_, grad in zip(cpu, gpu, grads, strict=True):
            c.grad, g_.grad = grad.clone(), grad.cuda()
        opt_cpu.step()
        opt_gpu.step()
        assert opt_gpu.overflow == opt_cpu.overflow == (step == 2)
        if step != 2:
            assert opt_gpu._global_grad_norm == pytest.approx(opt_cpu._global_grad_norm, rel=1e-5)
    for c, g_ in zip(cpu, gpu, strict=True):
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_gpu.full_state(g_, key).cpu(), opt_cpu.full_state(c, key),
                                       rtol=1e-5, atol=1e-7)
    assert int(opt_gpu.step_count) == int(opt_cpu.step_count) == 3
