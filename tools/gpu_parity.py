"""GPU correctness checks: what CI can only emulate on a CPU, against a reference, on CUDA tensors.

    python3 tools/gpu_parity.py            # fp32 logits vs transformers (7B widths, 2 layers)
    python3 tools/gpu_parity.py --all      # every check below (tools/gpu_check.py runs them too)
    python3 tools/gpu_parity.py --all --smoke   # the same at tiny shapes on a CPU, in seconds

Checks (each returns one JSON-able dict with ``check``, ``ok``, ``seconds`` and its errors):
  hf_logits       megallama's fp32 logits against transformers' LlamaForCausalLM on the same random
                  weights (the approach of tests/test_hf_parity.py; TF32 off)
  adamw_fused, adamw_distributed
                  three steps (clipping active, a NaN step skipped) of ``optim.impl=fused`` and of
                  ``distributed`` at dp 1 with ``MEGALLAMA_KERNELS=triton`` against the same steps
                  with ``reference``: master, moments and weights (tests/test_optim_kernels.py's
                  cases; on a CPU the Triton kernels run under its interpreter)
  flex_documents  FlexAttention with the document block mask (megallama.model.documents) against
                  SDPA under the dense mask, forward and (CUDA only: FlexAttention has no CPU
                  backward) backward; plain causal attention must differ (the mask is in effect)
  fp8_tensorwise, fp8_rowwise
                  a column- then row-parallel linear pair (tp 1) with ``trainer.fp8``'s matmuls
                  against the bf16 pair (within FP8's error, and not equal: FP8 is on) and against
                  torchao's own Float8Linear (CPU: emulated FP8)
  compiled_block  one transformer block (tp 1, fp32) under torch.compile against eager, causal and
                  with packed documents, forward and backward (CPU smoke: backend aot_eager)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

# Kernel against reference (tests/test_optim_kernels.py): fp32 rounding order only, measured
# <= 1.2e-7 absolute on CPU under the interpreter
ADAMW_RTOL, ADAMW_ATOL = 2e-6, 2e-7
# FP8 pair vs bf16, relative Frobenius error: measured 0.053-0.087 (tensorwise, e5m2 gradients)
# and 0.054-0.056 (rowwise) on CPU (emulated) at 64-512 wide pairs; above 0.01 shows FP8 is on
FP8_MAX, FP8_MIN = 0.15, 0.01
FP8_VS_TORCHAO = 1e-3  # our TP matmul at tp 1 vs torchao's Float8Linear: 0.0 on CPU (emulated)
COMPILED_TOL = 1e-4  # compiled vs eager block, fp32 with TF32 off: 0 (aot_eager) on CPU
LOGITS_TOL = 1e-5


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """fp32 matmuls in fp32 (TF32 off), restored afterwards: fp32 comparisons at 1e-5."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32."""
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---- fp32 logits vs transformers -------------------------------------------------------------
def check_hf_logits(device: torch.device, smoke: bool) -> dict:
    import transformers

    from megallama.config import preset
    from megallama.interop.names import meta_to_hf_state_dict
    from megallama.model.llama import Transformer

    cases = [("tiny_gqa", dict(vocab_size=512), 64)]
    if not smoke:
        cases.insert(0, ("llama2_7b", dict(n_layers=2, vocab_size=32000), 1024))
    errors = {}
    for name, over, seq in cases:
        cfg = preset(name, **over)
        model = Transformer(cfg, seed=11).eval()
        hf_cfg = transformers.LlamaConfig(**cfg.to_hf_config())
        hf_cfg._attn_implementation = "sdpa"
        hf = transformers.LlamaForCausalLM(hf_cfg).eval()
        hf.load_state_dict(meta_to_hf_state_dict(model.state_dict(), cfg), strict=False)
        model.to(device), hf.to(device)
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.vocab_size, (1, seq), generator=gen).to(device)
        with torch.no_grad(), no_tf32():
            errors[f"rel_err_{name}_seq{seq}"] = rel_err(model.full_logits(tokens), hf(tokens).logits)
        del model, hf
    return {"ok": max(errors.values()) < LOGITS_TOL, "tolerance": LOGITS_TOL, **errors}


# ---- Triton AdamW vs the torch reference -----------------------------------------------------
def _adamw_train(impl: str, mode: str, device: torch.device, dtype: torch.dtype, gas: int,
                 shapes: list[tuple[int, ...]]):
    """Three steps of ``impl`` with MEGALLAMA_KERNELS=``mode`` (step 1 has a NaN gradient and
    must change nothing); returns (optimizer, params, norms)."""
    from megallama.optim.distributed_adamw import DistributedAdamW
    from megallama.optim.fused_adamw import MasterWeightAdamW
    from megallama.parallel.topology import Grid, build_topology

    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in shapes]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": 0.1},
              {"params": [p for p in params if p.ndim == 1], "weight_decay": 0.0}]
    common = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-5, max_grad_norm=0.5,
                  topo=build_topology(Grid.from_world(1)), gas=gas)
    saved = os.environ.get("MEGALLAMA_KERNELS")
    os.environ["MEGALLAMA_KERNELS"] = mode  # the optimizers read the rule when built
    try:
        if impl == "fused":
            opt = MasterWeightAdamW(groups, **common)
        else:  # small buckets: shard runs start inside kernel blocks
            opt = DistributedAdamW(groups, **common, bucket_bytes=5000, registration_order=params)
    finally:
        os.environ.pop("MEGALLAMA_KERNELS") if saved is None else os.environ.update(
            MEGALLAMA_KERNELS=saved)
    if getattr(opt, "use_kernel", mode == "triton") is not (mode == "triton"):
        raise RuntimeError(f"MEGALLAMA_KERNELS={mode} did not select that path (use_kernel="
                           f"{opt.use_kernel})")
    norms = []
    for step in range(3):
        before = [p.detach().clone() for p in params]
        for micro in range(gas):
            g = torch.Generator().manual_seed(100 * step + micro)
            grads = [(torch.randn(p.shape, generator=g) * 3).bfloat16().to(device, dtype)
                     for p in params]
            if step == 1 and micro == gas - 1:
                grads[-1].view(-1)[0] = float("nan")
            sum((p * x).sum() for p, x in zip(params, grads, strict=True)).backward()
        opt.step()
        opt.zero_grad()
        if opt.overflow is not (step == 1):
            raise RuntimeError(f"step {step}: overflow={opt.overflow}")
        if step == 1 and not all(torch.equal(p, b) for p, b in zip(params, before, strict=True)):
            raise RuntimeError("a non-finite step changed the weights")
        norms.append(opt._global_grad_norm)
    return opt, params, norms


def check_adamw(device: torch.device, smoke: bool, impl: str) -> dict:
    from megallama.optim import adamw_kernel as ak

    b = ak.BLOCK
    shapes = [(1,), (23, 89), (b,), (b + 1, 1), (5,), (6, 7)]  # block +- 1, odd offsets
    if not smoke:
        shapes.insert(1, (4096, 4096))
    out, ok = {}, True
    for dtype, gas in ((torch.float32, 1), (torch.bfloat16, 1), (torch.bfloat16, 2)):
        tag = f"{str(dtype)[6:]}_gas{gas}"
        opt_k, pk, nk = _adamw_train(impl, "triton", device, dtype, gas, shapes)
        opt_r, pr, nr = _adamw_train(impl, "reference", device, dtype, gas, shapes)
        norm_err = max(abs(a - c) / c for a, c in zip(nk[::2], nr[::2], strict=True))
        ok &= norm_err < 1e-6
        worst = 0.0
        for a, c in zip(pk, pr, strict=True):
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                x, y = opt_k.full_state(a, key), opt_r.full_state(c, key)
                worst = max(worst, (x - y).abs().max().item())
                ok &= torch.allclose(x, y, rtol=ADAMW_RTOL, atol=ADAMW_ATOL)
            master = opt_k.full_state(a, "fp32")
            ok &= torch.equal(a.detach(), ak.split_fp32(master)[0] if dtype != torch.float32
                              else master)
        out[f"max_abs_diff_{tag}"], out[f"norm_rel_diff_{tag}"] = worst, norm_err
    return {"ok": bool(ok), "elements": sum(torch.Size(s).numel() for s in shapes),
            "rtol": ADAMW_RTOL, "atol": ADAMW_ATOL, **out}


# ---- FlexAttention with document masks vs SDPA under the dense mask --------------------------
def _segments(batch: int, seq: int, doc_len: int, gen: torch.Generator) -> torch.Tensor:
    """Random document boundaries (a one-token document at position 1 included)."""
    starts = torch.rand(batch, seq, generator=gen) < 1 / doc_len
    starts[:, 1] = starts[:, 2] = True
    return starts.long().cumsum(-1)


def _flex(q, k, v, segments):
    import inspect

    from megallama.model import documents

    if "kernel" in inspect.signature(documents.document_attention).parameters:
        return documents.document_attention(q, k, v, segments, kernel="flex")
    return documents.document_attention(q, k, v, segments)  # older API: flex on CUDA only


def check_flex_documents(device: torch.device, smoke: bool) -> dict:
    b, h, s, d, doc = (2, 2, 256, 16, 40) if smoke else (2, 32, 4096, 128, 512)
    dtype = torch.float32 if smoke else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    segments = _segments(b, s, doc, gen).to(device)
    qkv = [torch.randn(b, h, s, d, generator=gen).to(device, dtype) for _ in range(3)]
    grad_out = torch.randn(b, h, s, d, generator=gen).to(device, dtype)
    causal = torch.ones(s, s, dtype=torch.bool, device=device).tril()
    dense = ((segments[:, :, None] == segments[:, None, :]) & causal).unsqueeze(1)
    backward = device.type == "cuda"

    def run(fn, inputs_dtype):
        x = [t.detach().to(inputs_dtype).requires_grad_(backward) for t in qkv]
        out = fn(*x)
        if not backward:
            return [out]
        out.backward(grad_out.to(out.dtype))
        return [out] + [t.grad for t in x]

    with no_tf32():
        ref = run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
                  torch.float32)
    base = run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense), dtype)
    with warnings.catch_warnings():  # on a CPU: that eager FlexAttention is slow, as intended
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        flex = run(lambda q, k, v: _flex(q, k, v, segments), dtype)
    plain = F.scaled_dot_product_attention(*qkv, is_causal=True)
    names = ["out", "dq", "dk", "dv"][:len(ref)]
    out = {f"flex_{n}_rel_err": rel_err(f, r) for n, f, r in zip(names, flex, ref, strict=True)}
    out.update({f"sdpa_{n}_rel_err": rel_err(x, r) for n, x, r in zip(names, base, ref, strict=True)})
    tol = {n: 2 * out[f"sdpa_{n}_rel_err"] + 1e-5 for n in names}
    out["causal_only_out_rel_err"] = rel_err(plain, ref[0])
    ok = all(out[f"flex_{n}_rel_err"] <= tol[n] for n in names)
    ok &= out["causal_only_out_rel_err"] > 10 * tol["out"]  # the document mask is in effect
    return {"ok": bool(ok), "shape": [b, h, s, d], "dtype": str(dtype)[6:], "backward": backward,
            "documents": int(segments[:, -1].max()) + 1, "tolerance": "2 x sdpa's + 1e-5", **out}


# ---- FP8 linear pair vs bf16 -----------------------------------------------------------------
class _Pair(nn.Module):
    """w2(silu(w1 x)) with megallama's column- and row-parallel linears at tp 1."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        from megallama.parallel.layers import (
            ColumnParallelLinear,
            RowParallelLinear,
            TensorParallel,
        )

        tp = TensorParallel()
        self.w1 = ColumnParallelLinear(dim, hidden, tp, seed=1, key="w1", std=0.02)
        self.w2 = RowParallelLinear(hidden, dim, tp, seed=1, key="w2", std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)))


def _run_pair(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_()
    out = module(x)
    out.backward(grad_out)
    return [out, x.grad] + [p.grad for p in module.parameters()]


def check_fp8(device: torch.device, smoke: bool, recipe: str) -> dict:
    from torchao.float8 import convert_to_float8_training

    from megallama.parallel import fp8
    from megallama.parallel.layers import TensorParallel

    dim, hidden, tokens = (64, 176, 64) if smoke else (4096, 11008, 4096)
    emulate = device.type != "cuda"
    bf16 = _Pair(dim, hidden).to(device, torch.bfloat16)
    ours = copy.deepcopy(bf16)
    if fp8.convert_to_float8(ours, recipe, TensorParallel(), emulate=emulate) != 2:
        raise RuntimeError("convert_to_float8 did not convert both linears")
    ref = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.SiLU(),
                        nn.Linear(hidden, dim, bias=False)).to(device, torch.bfloat16)
    with torch.no_grad():
        ref[0].weight.copy_(bf16.w1.weight), ref[2].weight.copy_(bf16.w2.weight)
    ref = convert_to_float8_training(ref, config=fp8.float8_config(recipe, emulate=emulate))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, dim, generator=gen).to(device, torch.bfloat16)
    grad_out = torch.randn(1, tokens, dim, generator=gen).to(device, torch.bfloat16)
    got, want, theirs = (_run_pair(m, x, grad_out) for m in (ours, bf16, ref))
    names = ["out", "dx", "dw1", "dw2"]
    out = {f"vs_bf16_{n}_rel_err": rel_err(a, b) for n, a, b in zip(names, got, want, strict=True)}
    out.update({f"vs_torchao_{n}_rel_err": rel_err(a, b)
                for n, a, b in zip(names, got, theirs, strict=True)})
    ok = all(FP8_MIN < out[f"vs_bf16_{n}_rel_err"] < FP8_MAX for n in names)
    ok &= all(out[f"vs_torchao_{n}_rel_err"] <= FP8_VS_TORCHAO for n in names)
    return {"ok": bool(ok), "recipe": recipe, "emulated": emulate, "shape": [tokens, dim, hidden],
            "bf16_band": [FP8_MIN, FP8_MAX], "torchao_tol": FP8_VS_TORCHAO, **out}


# ---- compiled block vs eager -----------------------------------------------------------------
def check_compiled_block(device: torch.device, smoke: bool) -> dict:
    from megallama.config import preset
    from megallama.model.llama import TransformerBlock, compile_blocks
    from megallama.parallel.layers import TensorParallel

    seq = 64 if smoke else 1024
    cfg = preset("tiny" if smoke else "llama2_7b", n_layers=1, max_seq_len=seq)
    with no_tf32():
        eager = TransformerBlock(0, cfg, TensorParallel(), seed=3).to(device)
        compiled = copy.deepcopy(eager)
        if smoke:  # Inductor on a CPU costs ~40 s: the graph capture and autograd only
            compiled.compile(backend="aot_eager")
        else:
            compile_blocks(compiled)  # what parallel.compile_blocks=true does
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, seq, cfg.dim, generator=gen).to(device)
        grad_out = torch.randn(1, seq, cfg.dim, generator=gen).to(device)
        out: dict = {}
        for case, segments in (("causal", None), ("documents", _segments(1, seq, seq // 5, gen))):
            segs = None if segments is None else segments.to(device)
            results = []
            for block in (compiled, eager):
                block.zero_grad()
                xx = x.clone().requires_grad_()
                y = block(xx, None, segs)
                y.backward(grad_out)
                results.append([y, xx.grad] + [p.grad for p in block.parameters()])
            errs = [rel_err(a, b) for a, b in zip(*results, strict=True)]
            out[f"{case}_out_rel_err"], out[f"{case}_grads_max_rel_err"] = errs[0], max(errs[1:])
    ok = all(v < COMPILED_TOL for v in out.values())
    return {"ok": ok, "tolerance": COMPILED_TOL, "dim": cfg.dim, "seq": seq,
            "backend": "aot_eager" if smoke else "inductor", **out}


CHECKS: dict[str, Callable[[torch.device, bool], dict]] = {
    "hf_logits": check_hf_logits,
    "adamw_fused": lambda dev, smoke: check_adamw(dev, smoke, "fused"),
    "adamw_distributed": lambda dev, smoke: check_adamw(dev, smoke, "distributed"),
    "flex_documents": check_flex_documents,
    "fp8_tensorwise": lambda dev, smoke: check_fp8(dev, smoke, "tensorwise"),
    "fp8_rowwise": lambda dev, smoke: check_fp8(dev, smoke, "rowwise"),
    "compiled_block": check_compiled_block,
}


def run_check(name: str, device: torch.device, smoke: bool) -> dict:
    """One check, timed; a missing optional package is a skip, any other exception a failure
    (with the last lines of its traceback)."""
    start = time.perf_counter()
    try:
        result = CHECKS[name](device, smoke)
    except Exception as exc:  # a failed check is a result to report, not the end of the run
        optional = isinstance(exc, ModuleNotFoundError) and exc.name \
            and exc.name.split(".")[0] != "megallama"  # one of ours missing is a failure
        tail = traceback.format_exc().strip().splitlines()[-6:]
        result = ({"ok": None, "skipped": f"{exc.name} is not installed"} if optional else
                  {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500], "traceback": tail})
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return {"check": name, "device": str(device), **result,
            "seconds": round(time.perf_counter() - start, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--all", action="store_true", help="every check, not only hf_logits")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    results = [run_check(n, device, args.smoke or device.type == "cpu")
               for n in (CHECKS if args.all else ["hf_logits"])]
    for r in results:
        print(json.dumps(r), flush=True)
    failed = [r["check"] for r in results if r["ok"] is False]
    print(f"{len(results) - len(failed)} of {len(results)} checks passed or skipped"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
