"""The optimizer's Triton kernels (the GPU's code path) against their torch reference, on CPU
under Triton's interpreter (``TRITON_INTERPRET=1``; with a GPU the same tests also run compiled).

The kernels are reached as on a GPU: through the rule of :mod:`megallama.optim.kernels`
(``MEGALLAMA_KERNELS=triton``) and the optimizers' own call sites (``MasterWeightAdamW.step``,
``DistributedAdamW``'s shard update, the gradient norm's ``sum_of_squares``), besides the kernels
called directly at sizes 1 and block +- 1, on views whose offsets are not multiples of a block.
The DP-sharded path at dp 2 and 4 is in tests/distributed/test_triton_optimizer.py.
"""

from __future__ import annotations

import pytest
import torch

from megallama.config import ConfigError
from megallama.optim import adamw_kernel as ak
from megallama.optim import kernels
from megallama.optim.adamw_kernel import AdamWScalars, join_fp32, split_fp32
from megallama.optim.distributed_adamw import DistributedAdamW
from megallama.optim.fused_adamw import MasterWeightAdamW
from megallama.optim.kernels import use_triton
from megallama.parallel.topology import Grid, build_topology

pytest.importorskip("triton", reason="the kernels' tests need triton (pip install triton)")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
B = ak.BLOCK
SIZES = (1, B - 1, B, B + 1)  # one element; a block short, exact and over by one
OFFSET = 77  # every tensor a view starting here: not a multiple of any block
# Kernel against reference on the same inputs: the two differ only in fp32 rounding order
# (the update's expression, the norm's summation order): measured <= 1.2e-7 absolute
RTOL, ATOL = 2e-6, 2e-7


def set_kernels(monkeypatch: pytest.MonkeyPatch, mode: str, device: str = "cpu") -> None:
    """Select the optimizer kernels as a user would, with ``MEGALLAMA_KERNELS``. CPU tensors need
    Triton's interpreter, on from before triton's import (tests/conftest.py turns it on where
    there is no GPU; with a GPU the kernels are tested compiled, on CUDA tensors)."""
    monkeypatch.setenv("MEGALLAMA_KERNELS", mode)
    if device == "cpu" and mode == "triton" and not kernels.interpreting():
        pytest.skip("Triton's interpreter is off in this process (TRITON_INTERPRET unset)")


def test_kernel_rule(monkeypatch):
    """auto: Triton on CUDA only; the override picks either path on any device; a value or a
    setup that cannot work is one ConfigError line saying what to set."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    interpreted = kernels.interpreting()
    monkeypatch.delenv("MEGALLAMA_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not use_triton(cpu) and use_triton(cuda)
    monkeypatch.setenv("MEGALLAMA_KERNELS", "reference")
    assert not use_triton(cpu) and not use_triton(cuda)
    monkeypatch.setenv("MEGALLAMA_KERNELS", "triton")
    with pytest.raises(ConfigError, match="^MEGALLAMA_KERNELS=triton on cpu tensors: .* set "
                                          "TRITON_INTERPRET=1 as well, in the environment before "
                                          "triton is imported"):
        use_triton(cpu)
    assert use_triton(cuda)
    if not interpreted:
        return  # a GPU machine: the rest needs the interpreter on from the start
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(cpu)
    monkeypatch.setenv("MEGALLAMA_KERNELS", "fast")
    with pytest.raises(ConfigError, match=r"^MEGALLAMA_KERNELS='fast': choose one of \['auto', "):
        use_triton(cpu)
    params = [torch.nn.Parameter(torch.zeros(3))]
    for mode, want in (("triton", True), ("reference", False), ("auto", False)):
        monkeypatch.setenv("MEGALLAMA_KERNELS", mode)
        assert _fused(params, 0.0, 1).use_kernel is want
        assert _distributed(params, 0.0, 1).use_kernel is want


def _view(values: torch.Tensor) -> torch.Tensor:
    """``values`` as a view at OFFSET into a larger buffer of sentinels (-7)."""
    buf = torch.full((OFFSET + values.numel() + 5,), -7, dtype=values.dtype, device=values.device)
    buf[OFFSET:OFFSET + values.numel()] = values
    return buf[OFFSET:OFFSET + values.numel()]


def _base(t: torch.Tensor) -> torch.Tensor:
    return t._base if t._base is not None else t


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_dtype,grad_dtype", [(torch.bfloat16, torch.bfloat16),
                                                     (torch.bfloat16, torch.float32),
                                                     (torch.float32, torch.float32)])
def test_adamw_kernel_matches_reference(monkeypatch, device, weight_dtype, grad_dtype):
    """One update at sizes 1, B-1, B, B+1 on views at an offset: the kernel's master and moments
    equal the reference's (the bf16 weight is the master's upper half), the fp32 buffer is
    zeroed, nothing outside the view is touched, and ``ok = 0`` writes nothing at all."""
    set_kernels(monkeypatch, "triton", device)
    g = torch.Generator().manual_seed(0)
    s = AdamWScalars(3e-4, 0.9, 0.95, 1e-5, 0.1, step=7)
    coef, ok = torch.tensor(0.37, device=device), torch.tensor(1.0, device=device)
    split = weight_dtype != torch.float32
    for n in SIZES:
        master = torch.randn(n, generator=g).to(device)
        w, lo = split_fp32(master) if split else (master, None)
        m, v = torch.randn(n, generator=g).to(device), torch.rand(n, generator=g).to(device)
        grad = torch.randn(n, generator=g).to(device, grad_dtype)
        inputs = (w, lo, m, v)

        def copies(inputs=inputs):
            return [None if t is None else _view(t) for t in inputs]

        ref = copies()
        ak.adamw_reference(ref[0], grad, ref[1], ref[2], ref[3], coef, s)
        out, gz = copies(), _view(grad)
        ak.adamw_fused(out[0], gz, out[1], out[2], out[3], coef, ok, s, zero_grad=True)
        value = (lambda ts: join_fp32(ts[0], ts[1])) if split else (lambda ts: ts[0])
        torch.testing.assert_close(value(out), value(ref), rtol=RTOL, atol=ATOL, msg=f"n={n}")
        for got, want in zip(out[2:], ref[2:], strict=True):
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=f"n={n}")
        if split:
            assert torch.equal(out[0], split_fp32(value(out))[0]), n
        assert torch.count_nonzero(gz) == 0, n
        for t in (*out, gz):  # the sentinels around every view
            if t is not None:
                rest = torch.cat([_base(t)[:OFFSET], _base(t)[OFFSET + n:]])
                assert bool((rest == -7).all()), f"n={n}: wrote outside the tensor"
        keep, gk = copies(), _view(grad)
        ak.adamw_fused(keep[0], gk, keep[1], keep[2], keep[3], coef, torch.zeros_like(ok), s)
        for got, want in zip(keep, inputs, strict=True):
            if want is not None:
                assert torch.equal(got, want), f"n={n}: a step with ok=0 changed a tensor"
        assert torch.equal(gk, grad)


@pytest.mark.parametrize("device", DEVICES)
def test_sum_of_squares_matches_torch(monkeypatch, device):
    """At sizes 1 and NORM_BLOCK +- 1, bf16 and fp32, on views at an offset: fp32 sums of squares
    equal float64's within fp32 rounding, and the same inputs give the same bits."""
    set_kernels(monkeypatch, "triton", device)
    nb = ak.NORM_BLOCK
    g = torch.Generator().manual_seed(1)
    ts = [_view(torch.randn(n, generator=g).to(device, dt)) for n, dt in (
        (1, torch.bfloat16), (nb - 1, torch.float32), (nb, torch.bfloat16), (nb + 1, torch.float32),
        (5, torch.float32))]
    for group in (ts, ts[:1], ts[3:]):
        want = sum(t.double().square().sum() for t in group)
        got = ak.sum_of_squares(group)
        assert got.dtype == torch.float64 and got.shape == ()
        torch.testing.assert_close(got, want, rtol=2e-6, atol=0)
        assert torch.equal(ak.sum_of_squares(group), got)  # deterministic


@pytest.mark.parametrize("device", DEVICES)
def test_sum_of_squares_keeps_small_blocks(monkeypatch, device):
    """One large element and 127 blocks of small ones (each block's sum ~1e-8 of the total,
    below half an fp32 ulp of it; together 1e-6 of it): the blocks' fp32 partial sums are added
    in float64, so the result is the float64 sum within one block's fp32 rounding. (The large
    element's own block does lose its small squares: the bound is per block, see
    master_step.local_sum_of_squares.)"""
    set_kernels(monkeypatch, "triton", device)
    g = torch.Generator().manual_seed(2)
    t = torch.randn(128 * ak.NORM_BLOCK, generator=g) * 1e-3
    t[0] = 1e3
    t = t.to(device)
    want = t.double().square().sum()
    got = ak.sum_of_squares([t])
    assert abs(got.item() - want.item()) <= 1e-7 * want.item(), (got.item(), want.item())


LR, BETAS, EPS, WD = 1e-2, (0.9, 0.95), 1e-5, 0.1
# sizes 1, B - 1, B, B + 1 and one small matrix; matrices decay, vectors do not
SHAPES = [(1,), (23, 89), (B,), (B + 1, 1), (5,), (6, 7)]


def _params(dtype: torch.dtype, shapes=SHAPES) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _groups(params):
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": WD},
            {"params": [p for p in params if p.ndim == 1], "weight_decay": 0.0}]


def _fused(params, clip: float, gas: int) -> MasterWeightAdamW:
    return MasterWeightAdamW(_groups(params), lr=LR, betas=BETAS, eps=EPS, max_grad_norm=clip,
                             topo=build_topology(Grid.from_world(1)), gas=gas)


def _distributed(params, clip: float, gas: int) -> DistributedAdamW:
    """Buckets of 5000 gradient bytes: several per model, parameters cut at odd offsets."""
    return DistributedAdamW(_groups(params), lr=LR, betas=BETAS, eps=EPS, max_grad_norm=clip,
                            topo=build_topology(Grid.from_world(1)), gas=gas, bucket_bytes=5000,
                            registration_order=params)


def _backward(params, step: int, micro: int, nan: bool = False) -> None:
    """d/dp sum(p * g) = g through autograd (the optimizers' hooks see it); bf16-exact values."""
    g = torch.Generator().manual_seed(100 * step + micro)
    gs = [(torch.randn(p.shape, generator=g) * 3).bfloat16().to(p.dtype) for p in params]
    if nan:
        gs[2].view(-1)[B // 2] = float("nan")
    sum((p * x).sum() for p, x in zip(params, gs, strict=True)).backward()


def _train(monkeypatch, mode: str, make, dtype: torch.dtype, gas: int):
    """Three steps (clipping active; step 1 has a NaN gradient and must be skipped) of the
    optimizer ``make`` builds, with MEGALLAMA_KERNELS=``mode``; returns it and its params."""
    set_kernels(monkeypatch, mode)
    params = _params(dtype)
    opt = make(params, 0.5, gas)
    assert opt.use_kernel is (mode == "triton")
    for step in range(3):
        weights = [p.detach().clone() for p in params]
        for micro in range(gas):
            _backward(params, step, micro, nan=step == 1 and micro == gas - 1)
        opt.step()
        opt.zero_grad()
        assert opt.overflow is (step == 1), step
        if step == 1:
            assert all(torch.equal(p, w) for p, w in zip(params, weights, strict=True))
        else:
            assert opt._global_grad_norm > 0.5  # clipping is active
    assert int(opt.step_count) == 2
    return opt, params


@pytest.mark.parametrize("make", [_fused, _distributed], ids=["fused", "distributed"])
@pytest.mark.parametrize("dtype,gas", [(torch.float32, 1), (torch.bfloat16, 1),
                                       (torch.bfloat16, 2)])
def test_optimizer_triton_path_matches_reference(monkeypatch, make, dtype, gas):
    """The whole step through the optimizers' own call sites, Triton path against reference
    path: fp32 and bf16 parameters, bf16 gradients read directly (gas 1) or summed in an fp32
    buffer (gas 2, zeroed by the kernel), a skipped non-finite step, clipping from the kernel's
    norm; the distributed optimizer's runs start at offsets that are not multiples of a block."""
    opt_k, pk = _train(monkeypatch, "triton", make, dtype, gas)
    opt_r, pr = _train(monkeypatch, "reference", make, dtype, gas)
    assert opt_k._global_grad_norm == pytest.approx(opt_r._global_grad_norm, rel=1e-6)
    if make is _distributed:
        starts = {start % B for runs in opt_k.runs for start, _, _ in runs}
        assert starts - {0}, "some run should start inside a block"
    for i, (a, b) in enumerate(zip(pk, pr, strict=True)):
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_k.full_state(a, key), opt_r.full_state(b, key),
                                       rtol=RTOL, atol=ATOL, msg=f"param {i} {key}")
        if dtype == torch.bfloat16:  # the weight is the master's upper half on both paths
            assert torch.equal(a.detach(), split_fp32(opt_k.full_state(a, "fp32"))[0])
        else:
            assert torch.equal(a.detach(), opt_k.full_state(a, "fp32"))
