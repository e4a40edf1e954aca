"""Training-throughput benchmark: megallama (through the real Engine, DeepSpeed included) side by side
with transformers' LlamaForCausalLM on the same shapes.

    python3 tools/bench_gpu.py --out bench.jsonl            # on the GPU: Llama-2-7B widths, 8 layers
    python3 tools/bench_gpu.py --tiny                        # CPU smoke test (tiny shapes)

Every variant runs in a child process of this command (clean CUDA memory, clean peak statistics),
one after the other; the parent prints a table and writes one JSON line per variant. A step time is
the median over ``--steps`` synchronised steps after ``--warmup`` steps; peak memory is
``torch.cuda.max_memory_allocated`` over the whole child (weights, optimizer states, activations).

FLOPs/token = 6 N' + 12 L h T, N' = all parameters except the input embedding.

Variants:
  ml_base     megallama as first written: plain fp32 cross-entropy over the whole sequence, bf16
              gradients kept until the step (DeepSpeed immediate_grad_update off), DeepSpeed's
              data-parallel all-reduce left on at dp = 1, eager blocks
  ml_eager    megallama defaults: chunked cross-entropy, immediate_grad_update, no all-reduce
              at dp = 1, eager blocks
  ml_compile  ml_eager with parallel.compile_blocks=true (every block under torch.compile)
  ml_compile_mem  ml_compile with torch._functorch.config.activation_memory_budget = --mem-budget
              (default 0.5: Inductor recomputes more in backward to keep fewer activations)
  ml_fused    ml_compile with optim.impl=fused parallel.zero_stage=0: megallama's one-pass
              master-weight AdamW (Triton) instead of DeepSpeed's bf16 optimizer
  ml_fused_eager  ml_fused with eager blocks
  ml_distributed  ml_compile with optim.impl=distributed parallel.zero_stage=0: the fused update
              with its state sharded over DP and bucketed gradients (at dp = 1: its buffers'
              cost against ml_fused, which is what decides whether it can be the default)
  hf_eager    LlamaForCausalLM, fp32 params, bf16 autocast, SDPA attention, fused torch AdamW
  hf_compile  the same with torch.compile(model)
  hf_bf16     LlamaForCausalLM with bf16 params and bf16 AdamW states (no fp32 master), eager
  ml_fp8      ml_fused (the fastest bf16 variant) with trainer.fp8=tensorwise: the TP linears'
              matmuls in FP8 through torchao (megallama.parallel.fp8); head and embedding bf16
  ml_fp8_rowwise  the same with trainer.fp8=rowwise
  ml_fp8_eager    ml_fused_eager with trainer.fp8=tensorwise (on CPU, --tiny, torchao emulates)
  ml_fp8_nocache_eager  ml_fp8_eager without the engine's per-step weight casts
              (megallama.parallel.fp8.weights_fixed replaced by a no-op: every use casts afresh)
FP8 variants report MFU against the bf16 peak (the model's FLOPs, whatever precision runs them).

The real model and a real batch: ``--layers 32`` is the full Llama-2-7B, ``--ckpt [MODE]`` sets
parallel.activation_checkpointing to none, selective or full (bare ``--ckpt``: full; transformers:
gradient_checkpointing_enable, full only) where the activations of 32 layers do not fit, and
``--micro-batches N`` accumulates gradients over N micro-batches of one sequence per optimizer
step (tokens/s counts all N). A variant that runs out of GPU memory is reported as OOM (with the
memory it had reached), not as a failure of the command:

    python3 tools/bench_gpu.py --variants ml_fused,ml_fp8,hf_compile --micro-batches 8 --out b.jsonl
    python3 tools/bench_gpu.py --layers 32 --ckpt --variants ml_fused,ml_fp8,hf_eager --out b.jsonl
The megallama variants also record their per-step losses; the parent compares each with ml_base
(same init, same data), which is the "unchanged numerics" check. ``--eager`` runs the compiled
variants without torch.compile (the CPU smoke run of tools/gpu_check.py: each variant's optimizer,
FP8 recipe and packing path, without Inductor's ~40 s per process on a CPU); ``measure(name,
argv)`` times one variant for other tools (tools/gpu_check.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM
ML_VARIANTS = ("ml_base", "ml_eager", "ml_compile", "ml_compile_mem", "ml_fused", "ml_fused_eager")
COMPILED = ("ml_compile", "ml_compile_mem", "ml_fused")
HF_VARIANTS = ("hf_eager", "hf_bf16", "hf_compile")
FP8_RECIPE = {"ml_fp8": "tensorwise", "ml_fp8_rowwise": "rowwise", "ml_fp8_eager": "tensorwise",
              "ml_fp8_nocache_eager": "tensorwise"}
NO_WEIGHT_CACHE = ("ml_fp8_nocache_eager",)
ML_VARIANTS += tuple(FP8_RECIPE)
COMPILED += ("ml_fp8", "ml_fp8_rowwise")
ML_VARIANTS += ("ml_distributed",)
COMPILED += ("ml_distributed",)
MARK = "BENCH_RESULT "


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test on tiny shapes")
    ap.add_argument("--variants", default="all", help="comma list or 'all'")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=15, help="timed steps (median)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--mem-budget", type=float, default=0.5, help="activation budget, ml_compile_mem")
    ap.add_argument("--micro-batches", type=int, default=1,
                    help="micro-batches (of one sequence) per optimizer step: gradient accumulation")
    ap.add_argument("--ckpt", nargs="?", const="full", default="none",
                    choices=("none", "selective", "full"),
                    help="parallel.activation_checkpointing (every variant; bare: full)")
    ap.add_argument("--eager", action="store_true",
                    help="run the compiled variants without torch.compile (CPU smoke runs: "
                         "Inductor on a CPU costs ~40 s per process)")
    ap.add_argument("--packing", default="concat", choices=["concat", "documents"],
                    help="documents: megallama variants attend within packed documents")
    ap.add_argument("--doc-len", type=int, default=1024, help="mean document length (--packing)")
    ap.add_argument("--out", default=None, help="JSON-lines file (appended)")
    ap.add_argument("--profile", default=None, help="directory: torch-profiler summary per ml variant")
    ap.add_argument("--in-process", action="store_true", help="run the variants in this process")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args(argv)
    if args.micro_batches < 1:
        ap.error(f"--micro-batches {args.micro_batches}: must be >= 1")
    if args.tiny:
        args.layers, args.seq, args.vocab = 2, 64, 512
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
        args.in_process = True
    return args


def variants_of(args) -> list[str]:
    if args.variants == "all":
        names = list(ML_VARIANTS + HF_VARIANTS)
        if args.tiny:  # torch.compile on CPU costs ~40 s per process: not in the smoke test
            names = [n for n in names if n not in COMPILED and "compile" not in n]
        return names
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [n for n in names if n not in ML_VARIANTS + HF_VARIANTS]
    if bad:
        raise SystemExit(f"unknown variants {bad}; choose from {ML_VARIANTS + HF_VARIANTS}")
    if args.ckpt == "selective" and any(n.startswith("hf_") for n in names):
        raise SystemExit("--ckpt selective: transformers has full checkpointing only; "
                         "drop the hf_* variants or use --ckpt full")
    return names


# ---- shared pieces -------------------------------------------------------------------------------
def batches(args, device, n: int = 2):
    """``n`` fixed (tokens, labels) batches, cycled: the same data for every variant. With
    ``--packing documents`` the megallama variants also get segments (documents of random
    lengths around ``--doc-len``, attention within each) and labels -100 at document starts."""
    import torch

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(max(n, args.micro_batches)):  # one step's micro-batches are all different
        seq = torch.randint(0, args.vocab, (1, args.seq + 1), generator=g)
        tokens, labels = seq[:, :-1].to(device), seq[:, 1:].clone().to(device)
        if args.packing == "concat":
            out.append((tokens, labels))
            continue
        starts = torch.rand(1, args.seq + 1, generator=g) < 1 / args.doc_len
        segments = starts.long().cumsum(-1)
        labels[(segments[:, 1:] != segments[:, :-1]).to(device)] = -100
        out.append((tokens, labels, segments[:, :-1].to(device)))
    return out


def flops_per_token(n_params_no_embed: int, args, dim: int) -> float:
    return 6 * n_params_no_embed + 12 * args.layers * dim * args.seq


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_loop(step_fn, args, device, profile_path=None) -> tuple[list[float], list[float]]:
    """Run warmup + timed steps; returns (step times of the timed steps, losses of all steps)."""
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        loss = step_fn(i)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    if profile_path:
        profile(step_fn, device, profile_path)
    return times, losses


def profile(step_fn, device, path, n: int = 3) -> None:
    import torch
    from torch.profiler import ProfilerActivity

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(n):
            step_fn(i)
        sync(device)
    wall = (time.perf_counter() - t0) / n
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ka = prof.key_averages()
    busy = sum(getattr(e, "self_device_time_total", 0) for e in ka) / 1e6 / n
    with open(path, "w") as f:
        f.write(f"wall per profiled step {wall * 1e3:.1f} ms; kernel time per step {busy * 1e3:.1f} ms\n")
        f.write(ka.table(sort_by=key, row_limit=45, max_name_column_width=70))
        if device.type == "cuda":
            trace = path + ".trace.json"
            prof.export_chrome_trace(trace)
            f.write("\n" + gap_report(trace, n))
            os.remove(trace)


def gap_report(trace_path: str, n_steps: int, top: int = 25) -> str:
    """Where the GPU idles: gaps between consecutive kernels, attributed to the host op that
    launched the kernel after the gap (late launch = the host was the bottleneck)."""
    import bisect
    from collections import defaultdict

    events = json.load(open(trace_path))["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                     key=lambda e: e["ts"])
    launches = {e["args"].get("correlation"): e for e in events
                if e.get("cat") == "cuda_runtime" and "args" in e}
    ops = sorted((e for e in events if e.get("cat") in ("cpu_op", "user_annotation", "python_function")),
                 key=lambda e: e["ts"])
    starts = [e["ts"] for e in ops]
    by_op: dict[str, float] = defaultdict(float)
    total, late = 0.0, 0.0
    for prev, nxt in zip(kernels, kernels[1:], strict=False):
        gap = nxt["ts"] - (prev["ts"] + prev.get("dur", 0))
        if gap <= 5:
            continue
        total += gap
        launch = launches.get(nxt.get("args", {}).get("correlation"))
        where = "?"
        if launch is not None:
            late += gap if launch["ts"] > prev["ts"] + prev.get("dur", 0) else 0
            i = bisect.bisect_right(starts, launch["ts"])
            inner = [o for o in ops[max(0, i - 400):i] if o["ts"] + o.get("dur", 0) >= launch["ts"]]
            where = " > ".join(o["name"][:40] for o in inner[-3:]) or "?"
        by_op[where] += gap
    lines = [f"GPU idle between kernels: {total / 1e3 / n_steps:.2f} ms/step "
             f"({late / 1e3 / n_steps:.2f} ms/step with the next kernel launched late)"]
    for where, gap in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{gap / 1e3 / n_steps:8.3f} ms/step  {where}")
    return "\n".join(lines) + "\n"


def memory_stats(device) -> dict:
    import torch

    if device.type != "cuda":
        return {"peak_mem_gib": None}
    return {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def compiled(name: str, args) -> bool:
    """Whether the variant ran under torch.compile (``--eager`` runs every variant eagerly)."""
    return (name in COMPILED or name == "hf_compile") and not args.eager


def summarise(name, args, times, losses, fpt, device) -> dict:
    import torch

    step = statistics.median(times)
    tokens = args.seq * args.micro_batches  # micro-batches of one sequence per step
    tps = tokens / step
    result = {
        "variant": name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "layers": args.layers, "seq": args.seq, "vocab": args.vocab,
        "steps_timed": len(times), "warmup": args.warmup,
        "micro_batches": args.micro_batches, "activation_checkpointing": args.ckpt,
        "packing": args.packing, "compiled": compiled(name, args),
        "step_ms_median": step * 1e3, "step_ms_min": min(times) * 1e3, "step_ms_max": max(times) * 1e3,
        "tokens_per_s": tps, "flops_per_token": fpt, "model_tflops": fpt * tps / 1e12,
        "mfu": fpt * tps / H100_BF16_PEAK, "losses": losses,
    }
    result.update(memory_stats(device))
    return result


# ---- megallama -----------------------------------------------------------------------------------
def plain_cross_entropy(logits, labels, vocab_size, ignore_index=-100):
    """The first (unchunked) form of the loss at tp = 1: fp32 logits for the whole sequence."""
    logits = logits.float()
    row_max = logits.detach().amax(dim=-1)
    shifted = logits - row_max.unsqueeze(-1)
    valid = labels != ignore_index
    idx = labels.masked_fill(~valid, 0).unsqueeze(-1)
    target = shifted.gather(-1, idx).squeeze(-1)
    token_loss = (shifted.exp().sum(dim=-1).log() - target).masked_fill(~valid, 0.0)
    return token_loss.sum() / valid.sum().clamp(min=1)


def run_megallama(name: str, args, device) -> dict:
    import torch

    import megallama.engine.ds_config as engine_mod
    from megallama.config import preset
    from megallama.config.train_config import TrainConfig
    from megallama.engine import Engine
    from megallama.parallel.runtime import init_distributed
    from megallama.parallel.topology import Grid, build_topology, kv_replicas_for

    init_distributed(device)
    cfg = TrainConfig()
    if args.tiny:
        cfg.model = preset("tiny", vocab_size=args.vocab, n_layers=args.layers, max_seq_len=args.seq)
    else:
        cfg.model = preset("llama2_7b", vocab_size=args.vocab, n_layers=args.layers,
                           max_seq_len=args.seq)
    cfg.parallel.micro_batch_size, cfg.parallel.global_batch_size = 1, args.micro_batches
    cfg.parallel.activation_checkpointing = args.ckpt
    cfg.trainer.fp8 = FP8_RECIPE.get(name, "none")
    cfg.parallel.zero_stage = 1
    cfg.trainer.precision, cfg.trainer.steps, cfg.trainer.seed = "bf16", 1000, 1234
    cfg.optim.lr, cfg.optim.warmup_steps = 3e-4, 2
    cfg.data.seq_len = args.seq
    if name == "ml_base":  # DeepSpeed config as first written
        make = engine_mod.deepspeed_config

        def deepspeed_config(c, dp):
            ds = make(c, dp)
            ds["bf16"].pop("immediate_grad_update", None)
            return ds
        engine_mod.deepspeed_config = deepspeed_config
    cfg.parallel.compile_blocks = name in COMPILED and not args.eager
    if name.startswith("ml_fused") or name in FP8_RECIPE:
        cfg.optim.impl, cfg.parallel.zero_stage = "fused", 0
    if name == "ml_distributed":
        cfg.optim.impl, cfg.parallel.zero_stage = "distributed", 0
    if name == "ml_compile_mem":
        import torch._functorch.config

        torch._functorch.config.activation_memory_budget = args.mem_budget
    topo = build_topology(Grid(), kv_replicas_for(cfg.model.n_kv_heads, 1))
    loss_fn = None
    if name == "ml_base":  # plain cross-entropy, as first written
        def loss_fn(logits, labels):
            return plain_cross_entropy(logits, labels, args.vocab)
    try:
        engine = Engine(cfg, topo, device, loss_fn=loss_fn)
    finally:
        if name == "ml_base":
            engine_mod.deepspeed_config = make
    if name == "ml_base":
        engine.ds.enable_backward_allreduce = True
    params = list(engine.module.parameters())
    embed = engine.module.model.tok_embeddings.weight.numel()
    fpt = flops_per_token(sum(p.numel() for p in params) - embed, args, cfg.model.dim)
    data = batches(args, device)

    def step(i):
        n = args.micro_batches
        return engine.train_step([data[(i * n + j) % len(data)] for j in range(n)]).loss

    prof = os.path.join(args.profile, f"profile_{name}.txt") if args.profile else None
    times, losses = timed_loop(step, args, device, prof)
    out = summarise(name, args, times, losses, fpt, device)
    out["params"] = sum(p.numel() for p in params)
    out["fp8"], out["fp8_weight_cache"] = cfg.trainer.fp8, (
        cfg.trainer.fp8 != "none"
        and name not in NO_WEIGHT_CACHE)  # compiled blocks: fp8.step_casts, once per step too
    if device.type == "cuda":  # weights + optimizer states + fp32 gradient buffer, between steps
        out["resident_between_steps_gib"] = torch.cuda.memory_allocated(device) / 2**30
    return out


# ---- transformers --------------------------------------------------------------------------------
def run_hf(name: str, args, device) -> dict:
    import torch
    import torch.nn.functional as F
    import transformers

    torch.manual_seed(0)
    dim = 128 if args.tiny else 4096
    hf_cfg = transformers.LlamaConfig(
        hidden_size=dim, intermediate_size=352 if args.tiny else 11008,
        num_attention_heads=8 if args.tiny else 32, num_key_value_heads=8 if args.tiny else 32,
        num_hidden_layers=args.layers, vocab_size=args.vocab, max_position_embeddings=args.seq,
        rms_norm_eps=1e-5, tie_word_embeddings=False)
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_cfg)
    bf16_params = name == "hf_bf16"
    if bf16_params:
        model = model.to(torch.bfloat16)
    model.train()
    if args.ckpt == "full":  # transformers 5.x renames gradient_checkpointing_enable
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-5,
                            weight_decay=0.1, **fused)
    fwd = torch.compile(model) if name == "hf_compile" and not args.eager else model
    n_all = sum(p.numel() for p in model.parameters())
    fpt = flops_per_token(n_all - model.model.embed_tokens.weight.numel(), args, dim)
    data = batches(args, device)

    def step(i):
        total = 0.0
        for j in range(args.micro_batches):  # gradient accumulation: mean over micro-batches
            tokens, labels = data[(i * args.micro_batches + j) % len(data)][:2]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not bf16_params):
                logits = fwd(input_ids=tokens).logits
            loss = F.cross_entropy(logits.float().view(-1, args.vocab), labels.view(-1))
            (loss / args.micro_batches).backward()
            total += loss.detach() / args.micro_batches
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    times, losses = timed_loop(step, args, device)
    out = summarise(name, args, times, losses, fpt, device)
    out["params"] = n_all
    return out


# ---- driver --------------------------------------------------------------------------------------
@contextlib.contextmanager
def weight_cache(on: bool) -> Iterator[None]:
    """The engine's per-step FP8 weight casts (megallama.parallel.fp8.weights_fixed, entered by
    Engine.train_step) left on, or replaced by a no-op for the block (every use casts afresh, as
    before the cache): the harness's switch, the library has none."""
    import megallama.engine.deepspeed_engine as engine

    saved = engine.weights_fixed
    if not on:
        engine.weights_fixed = contextlib.nullcontext
    try:
        yield
    finally:
        engine.weights_fixed = saved


def run_variant(name: str, args) -> dict:
    import torch

    device = torch.device("cpu") if args.tiny else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.perf_counter()
    try:
        if name.startswith("ml_"):
            with weight_cache(name not in NO_WEIGHT_CACHE):
                out = run_megallama(name, args, device)
        else:
            out = run_hf(name, args, device)
    except torch.OutOfMemoryError as exc:  # a result (this variant does not fit), not a crash
        reached = memory_stats(device).get("peak_mem_gib")
        return {"variant": name, "oom": True, "error": f"out of memory at {reached:.1f} GiB: "
                + str(exc).splitlines()[0][:200]}
    out["wall_s"] = time.perf_counter() - t0
    return out


def run_child(name: str, args, argv, timeout: float | None = None) -> dict:
    """One variant in a child process (clean CUDA memory and peak statistics); ``timeout``
    seconds: the child is killed and the variant reported as an error."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--variant", name]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or ""  # bytes even with text=True, on some Pythons
        tail = (out.decode(errors="replace") if isinstance(out, bytes) else out)[-2000:]
        return {"variant": name, "error": f"killed after {timeout:.0f} s", "stdout_tail": tail}
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    return {"variant": name, "error": f"child exited {proc.returncode}", "stdout_tail": proc.stdout[-2000:]}


def measure(name: str, argv: list[str], timeout: float | None = None) -> dict:
    """One variant with this command's options ``argv`` (without ``--variants``): in this
    process under ``--tiny`` / ``--in-process``, else in a child. For other tools
    (tools/gpu_check.py) that time variants one by one."""
    args = parse_args(argv)
    if args.in_process:
        return run_variant(name, args)
    return run_child(name, args, argv, timeout)


def table(results: list[dict]) -> str:
    head = f"{'variant':<11} {'tokens/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'step ms':>8} {'peak GiB':>9}  loss vs ml_base"
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['variant']:<11} {'OOM' if r.get('oom') else 'ERROR'} {r['error']}")
            continue
        mem = "-" if r.get("peak_mem_gib") is None else f"{r['peak_mem_gib']:.2f}"
        diff = r.get("loss_max_abs_diff_vs_base")
        lines.append(f"{r['variant']:<11} {r['tokens_per_s']:>9.0f} {r['model_tflops']:>8.1f} "
                     f"{r['mfu']:>6.3f} {r['step_ms_median']:>8.2f} {mem:>9}  "
                     f"{'' if diff is None else f'max |dloss| {diff:.2e}'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    if args.variant:  # child
        print(MARK + json.dumps(run_variant(args.variant, args)), flush=True)
        return 0
    results = []
    for name in variants_of(args):
        r = run_variant(name, args) if args.in_process else run_child(name, args, argv)
        results.append(r)
        print(f"[bench] {name}: " + ("ERROR" if "error" in r else
              f"{r['tokens_per_s']:.0f} tok/s, {r['step_ms_median']:.1f} ms"), file=sys.stderr, flush=True)
    base = next((r for r in results if r["variant"] == "ml_base" and "error" not in r), None)
    for r in results:
        if base and r["variant"].startswith("ml_") and "error" not in r:
            pairs = zip(r["losses"], base["losses"], strict=False)
            r["loss_max_abs_diff_vs_base"] = max(abs(a - b) for a, b in pairs)
    print(table(results))
    if args.out:
        with open(args.out, "a") as f:
            for r in results:
                f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "command": " ".join(["tools/bench_gpu.py", *argv]), **r}) + "\n")
    return 1 if any("error" in r and not r.get("oom") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
