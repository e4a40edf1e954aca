"""Memory bandwidth of the fused optimizer kernels (megallama.optim.adamw_kernel) on a GPU.

    python3 tools/bench_optimizer.py [--numel 268435456]
    python3 tools/bench_optimizer.py --device cpu --numel 4096   # smoke run: Triton's interpreter

Times one AdamW update of a bf16 weight whose fp32 master is split over the weight and an int16
remainder (``adamw_fused``: reads gradient, weight, remainder and both fp32 moments, writes all but
the gradient back: 26 bytes/element moved) and the gradient sum of squares (2 bytes/element) for
several block sizes and warp counts, next to torch's fused AdamW on fp32 tensors (28 bytes/element)
and torch._foreach_norm. Prints GB/s; the defaults in adamw_kernel.py were picked with it
(docs/PERFORMANCE.md). On a CPU (``--device cpu``, Triton's interpreter switched on here) the
figures mean nothing: that mode only shows the tool runs (tests/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

UPDATE_BYTES = 26  # bf16 grad (2) + weight (2+2) + remainder (2+2) + moments (8+8)
TORCH_ADAMW_BYTES = 28  # fp32 param (4+4), grad (4), moments (8+8)


def timed(fn: Callable[[], object], device: torch.device, reps: int = 10) -> float:
    """Seconds per call of ``fn`` (CUDA events on a GPU, wall clock on a CPU)."""
    fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=int, default=1 << 28)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--reps", type=int, default=10, help="timed calls per configuration")
    args = ap.parse_args(argv)
    if args.numel < 1 or args.reps < 1:
        ap.error(f"--numel {args.numel} / --reps {args.reps}: must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU here (--device cpu runs the kernels under Triton's "
                 "interpreter, for a smoke run)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":  # before triton is imported (the kernels are built lazily)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from megallama.optim import adamw_kernel as ak  # after TRITON_INTERPRET is settled

    n, dev = args.numel, torch.device(args.device)
    w = torch.randn(n, device=dev).to(torch.bfloat16)
    g = torch.randn(n, device=dev).to(torch.bfloat16)
    lo = torch.zeros(n, dtype=torch.int16, device=dev)  # master = (w << 16) + lo
    m, v = torch.zeros(n, device=dev), torch.zeros(n, device=dev)
    coef, ok = torch.tensor(1.0, device=dev), torch.tensor(1.0, device=dev)
    s = ak.AdamWScalars(1e-4, 0.9, 0.95, 1e-8, 0.1, step=3)
    defaults = ak.BLOCK, ak.NUM_WARPS, ak.NORM_BLOCK
    try:
        for block in (1024, 2048, 4096, 8192):
            for warps in (4, 8, 16):
                ak.BLOCK, ak.NUM_WARPS = block, warps
                t = timed(lambda: ak.adamw_fused(w, g, lo, m, v, coef, ok, s), dev, args.reps)
                print(f"adamw_fused BLOCK={block:5d} warps={warps:2d}: {t * 1e3:7.3f} ms "
                      f"{UPDATE_BYTES * n / t / 1e9:7.0f} GB/s", flush=True)
        for block in (2048, 4096, 8192, 16384):
            ak.NORM_BLOCK = block
            t = timed(lambda: ak.sum_of_squares([g]), dev, args.reps)
            print(f"sum_of_squares NORM_BLOCK={block:5d}: {t * 1e3:7.3f} ms "
                  f"{2 * n / t / 1e9:7.0f} GB/s", flush=True)
    finally:
        ak.BLOCK, ak.NUM_WARPS, ak.NORM_BLOCK = defaults
    t = timed(lambda: torch._foreach_norm([g], 2.0, dtype=torch.float32), dev, args.reps)
    print(f"torch._foreach_norm (bf16):       {t * 1e3:7.3f} ms {2 * n / t / 1e9:7.0f} GB/s")
    p32, g32 = ak.join_fp32(w, lo), g.float()
    step = torch.tensor(3.0, device=dev)
    t = timed(lambda: torch._fused_adamw_([p32], [g32], [m], [v], [], [step], lr=1e-4, beta1=0.9,
                                          beta2=0.95, weight_decay=0.1, eps=1e-8, amsgrad=False,
                                          maximize=False), dev, args.reps)
    print(f"torch._fused_adamw_ (fp32):      {t * 1e3:7.3f} ms "
          f"{TORCH_ADAMW_BYTES * n / t / 1e9:7.0f} GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
