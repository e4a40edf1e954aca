"""One command that confirms on a real GPU what CI can only emulate, and times it.

    python3 tools/gpu_check.py                  # on one GPU: every part below but h200, < 8 min
    python3 tools/gpu_check.py --h200           # + the full Llama-2-7B (32 layers), bf16 and FP8
    python3 tools/gpu_check.py --parts h200     # the full-model part alone
    python3 tools/gpu_check.py --smoke          # every path at tiny shapes on the CPU

Parts (``--parts``, comma list; ``--h200`` adds ``h200``):
  check  the correctness checks of tools/gpu_parity.py on CUDA tensors (seconds each): Triton
         AdamW of optim.impl=fused and of distributed (dp 1) against the torch reference,
         FlexAttention document masks against SDPA's dense mask (forward and backward), an FP8
         linear pair (tensorwise and rowwise) against bf16, a compiled block (tp 1) against eager,
         fp32 logits against transformers;
  bench  tools/bench_gpu.py's variants ml_fused, ml_distributed, ml_fp8 (tensorwise) and
         ml_fp8_rowwise, compiled, at Llama-2-7B widths, 8 layers, seq 4096, 1 and 8 micro-batches
         per step, next to transformers' best variant (the fastest hf_* of earlier runs on this card
         in docs/perf/, else hf_bf16; ``--hf`` picks one), and ml_fused with data.packing=documents
         against concat; each megallama variant's peak max_memory_allocated next to the planner's
         (megallama.training.planner, the figure megallama-plan prints, without its fixed 3 GiB for
         the CUDA context, which max_memory_allocated does not see);
  recompute, fp8cache, preset  (tools/gpu_check_sections.py) at 7B widths, 8 layers, seq 4096,
         2 micro-batches: the three activation_checkpointing modes; FP8 eager with and without the
         per-step weight casts, and compiled; the 7B pretraining preset's slice against the
         planner at dp 1 and at its dp 8. Every report also lists what needs more GPUs;
  h200   the full Llama-2-7B (--layers 32), ml_fused (bf16) and ml_fp8, 8 micro-batches, with the
         activation checkpointing of the planner's first choice for this card; where the planner
         says it does not fit (an 80 GiB H100), that is reported with the planner's bytes and
         nothing runs.

Order: check, bench at the first micro-batch count and documents, recompute, fp8cache, preset,
bench at the other micro-batch counts, h200. Every benchmark runs in its own child process (clean
peak statistics). ``--budget-s`` (default 450) bounds the run: a benchmark that would start after
it is reported as not run. A part that raises is recorded (kind section_error, with its
traceback's tail) and the run goes on. Appends one JSON line per check, benchmark, preset,
needs-more-GPUs item and comparison to ``--out-dir``/<card>-<date>-gpu-check.jsonl (default
docs/perf/; runs/gpu_check/ for --smoke), the tables to the .md beside it, and prints them.
Exit status 1 when a check fails or a benchmark or a part errs (an out-of-memory benchmark is a
result), 2 for bad options. ``--smoke`` (= ``--device cpu``) runs it all on the CPU at tiny
shapes: Triton under its interpreter, FlexAttention forward only, FP8 emulated, torch.compile
with backend aot_eager in the block check and the benchmarks eager; its timings mean nothing and
no target is judged.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
GIB = 2**30
ML = ("ml_fused", "ml_distributed", "ml_fp8", "ml_fp8_rowwise")
PARTS = ("check", "bench", "recompute", "fp8cache", "preset", "h200")
DEFAULT_PARTS = "check,bench,recompute,fp8cache,preset"
HF_DEFAULT = "hf_bf16"  # the fastest transformers variant of docs/perf/h100-2026-11-23.jsonl
# Targets of the GPU issue: tokens/s ratio each comparison must reach at least (peak memory:
# within 10% of the planner's, judged in comparisons())
TARGETS = {"ml_distributed / ml_fused": 0.98, "ml_fp8 / ml_fused": 1.35,
           "ml_fp8_rowwise / ml_fused": 1.35, "documents / concat": 0.9}


def tool(name: str) -> ModuleType:
    """tools/<name>.py as a module (tools/ is not a package)."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    return importlib.import_module(name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (CI)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu is --smoke")
    ap.add_argument("--parts", default=DEFAULT_PARTS, help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--h200", action="store_true", help="add the full-model part (h200)")
    ap.add_argument("--checks", default="all", help="comma list of gpu_parity checks, or all")
    ap.add_argument("--micro-batches", default=None, help="comma list (default 1,8; smoke 1,2)")
    ap.add_argument("--hf", default="best", help="transformers variant beside ours, or best")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="start no benchmark after this many seconds")
    ap.add_argument("--gpu-mem-gib", type=float, default=None,
                    help="capacity the planner fits the full model into (default: the card's)")
    ap.add_argument("--out-dir", default=None, help="where the JSON lines go")
    args = ap.parse_args(argv)
    args.smoke = args.smoke or args.device == "cpu"
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()] + ["h200"] * args.h200
    bad = [p for p in args.parts if p not in PARTS]
    if bad:
        ap.error(f"--parts {','.join(bad)}: choose from {', '.join(PARTS)}")
    try:
        args.micro_batches = [int(x) for x in (args.micro_batches or
                                               ("1,2" if args.smoke else "1,8")).split(",")]
    except ValueError:
        ap.error(f"--micro-batches {args.micro_batches}: a comma list of integers >= 1")
    if min(args.micro_batches) < 1:
        ap.error(f"--micro-batches {args.micro_batches}: each must be >= 1")
    args.out_dir = Path(args.out_dir or (REPO / ("runs/gpu_check" if args.smoke else "docs/perf")))
    return args


# ---- what the card is ------------------------------------------------------------------------
def card_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def card_slug(name: str) -> str:
    """h100, h200, a100, ... from the device name; cpu for the CPU."""
    found = re.search(r"\b([A-Z]\d{2,4})\b", name)
    return found.group(1).lower() if found else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def best_hf(slug: str, card: str) -> str:
    """The transformers variant with the most tokens/s in earlier 8-layer, 1-micro-batch runs on
    this card (docs/perf/<slug>-*.jsonl), else HF_DEFAULT."""
    best: tuple[float, str] = (0.0, HF_DEFAULT)
    for path in sorted((REPO / "docs" / "perf").glob(f"{slug}-*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if (str(r.get("variant", "")).startswith("hf_") and r.get("device") == card
                    and r.get("layers") == 8 and r.get("micro_batches", 1) == 1
                    and r.get("tokens_per_s")):
                best = max(best, (r["tokens_per_s"], r["variant"]))
    return best[1]


# ---- the parts -------------------------------------------------------------------------------
class Clock:
    """The run's time budget: a benchmark starts only if the longest one so far would end in it."""

    def __init__(self, budget_s: float) -> None:
        self.start, self.budget, self.longest = time.monotonic(), budget_s, 0.0

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def run(self, fn, *args: Any) -> dict | None:
        if self.left() < self.longest:
            return None
        t0 = time.monotonic()
        out = fn(*args, max(self.left(), 60.0))
        self.longest = max(self.longest, time.monotonic() - t0)
        return out


def bench_argv(args, micro_batches: int, packing: str = "concat", layers: int | None = None,
               ckpt: str = "none", eager: bool = False) -> list[str]:
    """tools/bench_gpu.py's options for one benchmark: fewer steps than its defaults (the
    median of 8 after 3 warm-up steps, 4 after 2 at several micro-batches), tiny and eager for
    --smoke; ``ckpt``: parallel.activation_checkpointing; ``eager``: no torch.compile."""
    steps, warmup = (2, 1) if args.smoke else ((8, 3) if micro_batches == 1 else (4, 2))
    argv = ["--micro-batches", str(micro_batches), "--steps", str(steps), "--warmup", str(warmup),
            "--packing", packing]
    if args.smoke:
        argv += ["--tiny", "--eager"] + (["--doc-len", "8"] if packing == "documents" else [])
    elif eager:
        argv += ["--eager"]
    if layers:
        argv += ["--layers", str(layers)]
    return argv + (["--ckpt", ckpt] if ckpt != "none" else [])


def bench_one(args, clock: Clock, variant: str, argv: list[str], section: str = "bench") -> dict:
    """One benchmark of tools/bench_gpu.py (within the budget), with the planner's peak beside a
    megallama row (a planner that raises leaves planner_error, not a failed run)."""
    bench = tool("bench_gpu")
    row = clock.run(lambda a, t: bench.measure(variant, a, timeout=t), argv)
    parsed = bench.parse_args(argv)
    label = {"kind": "bench", "section": section, "variant": variant,
             "micro_batches": parsed.micro_batches, "packing": parsed.packing,
             "activation_checkpointing": parsed.ckpt, "bench_args": " ".join(argv)}
    if row is None:
        return {**label, "not_run": f"time budget of {args.budget_s:.0f} s spent"}
    row = {**label, **row}
    if variant.startswith("ml_") and "error" not in row:
        try:
            row.update(tool("gpu_check_plan").planner_peak(variant, row, args.smoke))
        except Exception as exc:  # noqa: BLE001 -- the measurement stands without the plan
            row["planner_error"] = f"{type(exc).__name__}: {exc}"[:300]
    print(f"[gpu_check] {variant} {' '.join(argv)}: "
          + (row.get("error") or f"{row['tokens_per_s']:.0f} tokens/s"), file=sys.stderr,
          flush=True)
    return row


def bench_part(args, clock: Clock, hf: str, first: bool) -> list[dict]:
    """``first``: the variants at the first micro-batch count and documents packing; else the
    variants at the other counts (run after the other sections, so the budget cuts these)."""
    mb1, *more = args.micro_batches
    if first:
        todo = [(v, bench_argv(args, mb1)) for v in (*ML, hf)]
        todo.append(("ml_fused", bench_argv(args, mb1, "documents")))
    else:
        todo = [(v, bench_argv(args, mb)) for mb in more for v in (*ML, hf)]
    return [bench_one(args, clock, v, argv) for v, argv in todo]


def h200_part(args, clock: Clock, capacity_gib: float) -> list[dict]:
    layers, seq, vocab, mb = (2, 64, 512, 2) if args.smoke else (32, 4096, 32000, 8)
    plans = tool("gpu_check_plan")
    cfg = plans.model_config(args.smoke, layers, seq, vocab)
    rows = []
    for variant in ("ml_fused", "ml_fp8"):
        plan = plans.full_model_plan(cfg, variant, seq, mb, capacity_gib)
        if plan["fits"]:
            argv = bench_argv(args, mb, layers=layers, ckpt=plan["activation_checkpointing"])
            plan.update({k: v for k, v in bench_one(args, clock, variant, argv, "h200").items()
                         if k not in plan})
        rows.append({"section": "h200", **plan, "kind": "full_model"})
    return rows


def find(rows: list[dict], want: dict) -> dict | None:
    """The benchmark row of the bench part with every field of ``want`` that has a throughput."""
    return next((r for r in rows if r.get("kind") == "bench" and "tokens_per_s" in r
                 and r.get("section", "bench") == "bench"
                 and all(r.get(k) == v for k, v in want.items())), None)


def compare(rows: list[dict], name: str, num: dict, den: dict, smoke: bool) -> dict:
    """tokens/s of row ``num`` over row ``den`` against the issue's target, and the largest
    per-step loss difference of two megallama variants (same data, same initialisation)."""
    a, b = find(rows, num), find(rows, den)
    value = a["tokens_per_s"] / b["tokens_per_s"] if a and b else None
    target = TARGETS.get(name)
    out = {"kind": "comparison", "comparison": name, "micro_batches": num["micro_batches"],
           "tokens_per_s_ratio": value, "target": target,
           "met": None if smoke or value is None or target is None else value >= target}
    ours = a and b and a["variant"].startswith("ml_") and b["variant"].startswith("ml_")
    if ours and a["packing"] == b["packing"]:
        out["loss_max_abs_diff"] = max(abs(x - y) for x, y in zip(a["losses"], b["losses"],
                                                                   strict=False))
    return out


def comparisons(rows: list[dict], args, hf: str) -> list[dict]:
    """Ratios of tokens/s the issue sets targets for, and each megallama row's peak over the
    planner's; ``met`` is None on a CPU (timings of a smoke run mean nothing) or when a side is
    missing."""
    out = []
    for mb in args.micro_batches:
        fused = {"variant": "ml_fused", "packing": "concat", "micro_batches": mb}
        for v in ML[1:]:
            out.append(compare(rows, f"{v} / ml_fused", {**fused, "variant": v}, fused,
                               args.smoke))
        out.append(compare(rows, f"ml_fused / {hf}", fused, {**fused, "variant": hf},
                           args.smoke))
        if mb == args.micro_batches[0]:
            out.append(compare(rows, "documents / concat", {**fused, "packing": "documents"},
                               fused, args.smoke))
    for r in rows:
        if r["kind"] in ("bench", "full_model") and r.get("peak_over_planner") is not None:
            met = None if args.smoke else abs(r["peak_over_planner"] - 1) <= 0.10
            where = f"{r.get('section', r['kind'])} {r.get('activation_checkpointing', '')}"
            out.append({"kind": "comparison", "section": r.get("section"),
                        "comparison": f"{r['variant']} peak / planner [{where.strip()}]",
                        "micro_batches": r["micro_batches"], "packing": r.get("packing"),
                        "ratio": r["peak_over_planner"], "target": "1 +- 0.10", "met": met})
    return out


# ---- output ----------------------------------------------------------------------------------
def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write(rows: list[dict], path: Path, argv: list[str], card: str) -> None:
    import torch

    common = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": " ".join(["tools/gpu_check.py", *argv]), "card": card,
              "torch": torch.__version__, "commit": git_commit()}
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps({**common, **r}) + "\n")


# ---- main ------------------------------------------------------------------------------------
def check_part(args, device) -> list[dict]:
    parity, rows = tool("gpu_parity"), []
    names = list(parity.CHECKS) if args.checks == "all" else args.checks.split(",")
    for name in names:
        rows.append({"kind": "check", **parity.run_check(name, device, args.smoke)})
        print(f"[gpu_check] {name}: {rows[-1]['ok']} ({rows[-1]['seconds']} s)",
              file=sys.stderr, flush=True)
    return rows


def run_parts(args, device, card: str) -> list[dict]:
    """The parts in their order (check, bench at the first micro-batch count, the sections,
    bench at the others, h200), each guarded: one that raises leaves a section_error row and
    the next one runs. Then what needs more GPUs, and the comparisons."""
    import torch

    clock, rows, sections = Clock(args.budget_s), [], tool("gpu_check_sections")
    hf = best_hf(card_slug(card), card) if args.hf == "best" else args.hf

    def bench(section: str, variant: str, argv: list[str]) -> dict:
        return bench_one(args, clock, variant, argv, section)

    def argv_of(micro_batches: int, **kw) -> list[str]:
        return bench_argv(args, micro_batches, **kw)

    def capacity() -> float:
        return args.gpu_mem_gib or (torch.cuda.get_device_properties(device).total_memory / GIB
                                    if device.type == "cuda" else 80.0)

    todo = [("check", lambda: check_part(args, device)),
            ("bench", lambda: bench_part(args, clock, hf, first=True))]
    todo += [(name, lambda name=name: sections.run_section(name, bench, argv_of, rows,
                                                           args.smoke))
             for name in sections.SECTIONS]
    todo += [("bench", lambda: bench_part(args, clock, hf, first=False)),
             ("h200", lambda: h200_part(args, clock, capacity()))]
    for name, part in todo:
        if name in args.parts:
            try:
                rows += part()
            except Exception as exc:  # noqa: BLE001 -- recorded; the other parts still run
                rows.append(sections.section_error(name, exc))
                print(f"[gpu_check] part {name} failed: {rows[-1]['error']}", file=sys.stderr,
                      flush=True)
    rows += sections.multi_gpu_rows()
    try:
        rows += comparisons(rows, args, hf) if {"bench", "h200"} & set(args.parts) else []
    except Exception as exc:  # noqa: BLE001
        rows.append(sections.section_error("comparisons", exc))
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.smoke:  # Triton's interpreter must be on before triton is first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA GPU here; --smoke runs every path at tiny shapes on "
              "the CPU", file=sys.stderr)
        return 2
    unknown = set() if args.checks == "all" else set(args.checks.split(",")) - set(
        tool("gpu_parity").CHECKS)
    if unknown:
        print(f"gpu_check: error: --checks {','.join(sorted(unknown))}: choose from "
              f"{', '.join(tool('gpu_parity').CHECKS)} or all", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    card = card_name(device)
    try:
        args.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"gpu_check: error: --out-dir {args.out_dir}: {exc.strerror}", file=sys.stderr)
        return 2
    path = args.out_dir / f"{card_slug(card)}-{time.strftime('%Y-%m-%d', time.gmtime())}-gpu-check.jsonl"
    rows = run_parts(args, device, card)
    write(rows, path, argv, card)
    text = tool("gpu_check_report").tables(rows, card)
    with open(path.with_suffix(".md"), "a") as f:  # the same tables, for a reader
        f.write(f"## tools/gpu_check.py {' '.join(argv)}\n\n{card}, "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, commit {git_commit()}"
                f"\n\n```\n{text}\n```\n\n")
    print(text)
    print(f"{len(rows)} records appended to {path} (tables: {path.with_suffix('.md')})")
    failed = [r for r in rows if r.get("ok") is False or r["kind"] == "section_error"
              or (r["kind"] in ("bench", "full_model", "preset") and r.get("error")
                  and not r.get("oom"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
