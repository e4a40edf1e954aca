"""Memory bandwidth of the fused optimizer kernels (megallama.optim.adamw_kernel) on a GPU.

    python3 tools/bench_optimizer.py [--numel 268435456]

Times one AdamW update (bf16 weight and gradient, fp32 master and moments: 28 bytes/element moved)
and the gradient sum of squares (2 bytes/element) for several block sizes and warp counts, next to
torch's fused AdamW on fp32 tensors (28 bytes/element as well) and torch._foreach_norm. Prints
GB/s; the defaults in adamw_kernel.py were picked with it (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse

import torch

from megallama.engine import adamw_kernel as ak


def timed(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=int, default=1 << 28)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_optimizer: needs a CUDA GPU")
    n, dev = args.numel, "cuda"
    w = torch.randn(n, device=dev).to(torch.bfloat16)
    g = torch.randn(n, device=dev).to(torch.bfloat16)
    master, m, v = w.float(), torch.zeros(n, device=dev), torch.zeros(n, device=dev)
    coef, ok = torch.tensor(1.0, device=dev), torch.tensor(1.0, device=dev)
    s = ak.AdamWScalars(1e-4, 0.9, 0.95, 1e-8, 0.1, step=3)
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            ak.BLOCK, ak.NUM_WARPS = block, warps
            t = timed(lambda: ak.adamw_fused(w, g, master, m, v, coef, ok, s))
            print(f"adamw_fused BLOCK={block:5d} warps={warps:2d}: {t * 1e3:7.3f} ms "
                  f"{28 * n / t / 1e9:7.0f} GB/s", flush=True)
    for block in (2048, 4096, 8192, 16384):
        ak.NORM_BLOCK = block
        t = timed(lambda: ak.sum_of_squares([g]))
        print(f"sum_of_squares NORM_BLOCK={block:5d}: {t * 1e3:7.3f} ms {2 * n / t / 1e9:7.0f} GB/s")
    t = timed(lambda: torch._foreach_norm([g], 2.0, dtype=torch.float32))
    print(f"torch._foreach_norm (bf16):       {t * 1e3:7.3f} ms {2 * n / t / 1e9:7.0f} GB/s")
    p32, g32 = master.clone(), g.float()
    step = torch.tensor(3.0, device=dev)
    t = timed(lambda: torch._fused_adamw_([p32], [g32], [m], [v], [], [step], lr=1e-4, beta1=0.9,
                                          beta2=0.95, weight_decay=0.1, eps=1e-8, amsgrad=False,
                                          maximize=False))
    print(f"torch._fused_adamw_ (fp32):      {t * 1e3:7.3f} ms {28 * n / t / 1e9:7.0f} GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
