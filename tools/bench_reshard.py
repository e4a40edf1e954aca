"""Benchmark megallama-reshard on a 7B-shaped random checkpoint: meta -> hf -> megallama(tp2, pp2).

Generates a Llama-2-7B-shaped consolidated checkpoint (bf16, K=1; ``--layers`` of the 32 blocks, the
embedding and head at full size), runs each conversion as a child process and reports seconds,
GB/s and the child's peak RSS (``os.wait4``: ru_maxrss of that process alone) next to the goal
"2 x largest tensor + one output buffer" and to the RSS of a child that only imports the package.
For comparison, the same meta -> hf conversion through transformers' convert_llama_weights_to_hf.py
when that script is available (``--hf-script`` or inside the installed transformers), otherwise
through an in-memory baseline that does what that script does (torch.load every shard whole,
concatenate, permute, save) -- reported under its own name.

    python tools/bench_reshard.py --layers 8 --workdir /tmp/bench-reshard
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megallama.config import preset  # noqa: E402
from megallama.interop.meta import MetaSink  # noqa: E402
from megallama.interop.names import model_tensor_shapes  # noqa: E402

BASELINE = """
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from megallama.interop.names import meta_tensor_to_hf
from megallama.config import ModelConfig
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
params = json.loads((src / "params.json").read_text())
sd = torch.load(src / "consolidated.00.pth", map_location="cpu", weights_only=True)
cfg = ModelConfig.from_meta_params(params, vocab_size=sd["tok_embeddings.weight"].shape[0])
sd.pop("rope.freqs", None)
hf = dict(meta_tensor_to_hf(k, v, cfg) for k, v in sd.items())
del sd
dst.mkdir(parents=True)
save_file({k: v.contiguous() for k, v in hf.items()}, dst / "model.safetensors")
"""


def generate(path: Path, layers: int) -> int:
    """A random 7B-shaped consolidated checkpoint written with the streaming Meta writer."""
    cfg = preset("llama2_7b", n_layers=layers)
    path.mkdir(parents=True)
    sink = MetaSink(path, cfg, torch.bfloat16, 1)
    pool = torch.randn(1 << 25, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    total = 0
    for i, (name, shape) in enumerate(model_tensor_shapes(cfg)):
        n = torch.Size(shape).numel()
        t = torch.empty(n, dtype=torch.bfloat16)  # filled from the pool cyclically: one copy
        pos, src = 0, (i * 7919) % pool.numel()
        while pos < n:
            k = min(n - pos, pool.numel() - src)
            t[pos:pos + k] = pool[src:src + k]
            pos, src = pos + k, 0
        t = t.view(shape)
        sink.write(name, t)
        total += n * 2
        del t
    sink.finish()
    return total


WRAPPER = """
import os, resource, runpy, sys
kind, target = sys.argv[1], sys.argv[2]
sys.argv = [target] + sys.argv[3:]
try:
    if kind == "-m":
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    elif kind == "-c":
        exec(compile(target, "<bench>", "exec"), {"__name__": "__main__"})
    else:
        runpy.run_path(target, run_name="__main__")
except SystemExit as e:
    if e.code not in (0, None):
        raise
finally:
    with open("/proc/self/status") as f:
        hwm = next(line for line in f if line.startswith("VmHWM")).split()[1]
    use = resource.getrusage(resource.RUSAGE_SELF)
    with open(os.environ["BENCH_HWM"], "w") as f:
        f.write(f"{hwm} {use.ru_utime + use.ru_stime}")
"""


def run_child(kind: str, target: str, argv: list[str], hwm_file: Path) -> dict[str, float]:
    """Run a module (-m), code (-c) or script in a fresh interpreter; wall seconds and its peak
    RSS (VmHWM, which exec resets -- unlike ru_maxrss, which a child inherits from its parent) and
    CPU seconds (user + system; on a loaded machine wall time mostly measures the other load)."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, kind, target, *argv], cwd=REPO,
                          env={**os.environ, "BENCH_HWM": str(hwm_file)}, capture_output=True,
                          text=True)
    seconds = time.monotonic() - t0
    if proc.returncode:
        raise SystemExit(f"{target} {' '.join(argv)} failed ({proc.returncode}):\n"
                         f"{(proc.stdout + proc.stderr)[-2000:]}")
    hwm_kb, cpu = hwm_file.read_text().split()
    return {"seconds": seconds, "cpu_seconds": float(cpu), "peak_rss_gb": int(hwm_kb) * 1024 / 1e9}


def find_hf_script(given: str | None) -> Path | None:
    if given:
        return Path(given)
    try:
        import transformers
    except ImportError:
        return None
    path = Path(transformers.__file__).parent / "models/llama/convert_llama_weights_to_hf.py"
    return path if path.is_file() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8, help="blocks of 7B's 32 to generate")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-reshard"))
    ap.add_argument("--hf-script", default=None, help="path to convert_llama_weights_to_hf.py")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = ap.parse_args()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg = preset("llama2_7b", n_layers=args.layers)
    shapes = dict(model_tensor_shapes(cfg))
    largest = max(torch.Size(s).numel() for s in shapes.values()) * 2
    t0 = time.monotonic()
    total = generate(work / "meta", args.layers)
    gen_s = time.monotonic() - t0
    hwm = work / "hwm"
    results: dict[str, dict[str, float]] = {}
    results["import only"] = run_child("-c", "import megallama.interop.convert", [], hwm)
    steps = [("meta -> hf", ["--src", f"meta:{work / 'meta'}", "--dst", f"hf:{work / 'hf'}"]),
             ("hf -> megallama tp2 pp2", ["--src", f"hf:{work / 'hf'}", "--dst",
                                          f"megallama:{work / 'mg'}", "--tp", "2", "--pp", "2"])]
    for label, argv in steps:
        os.sync()
        results[label] = run_child("-m", "megallama.reshard", ["--no-progress", *argv], hwm)
    if not args.no_baseline:
        script = find_hf_script(args.hf_script)
        os.sync()
        if script is not None:
            label = "meta -> hf via transformers convert_llama_weights_to_hf.py"
            results[label] = run_child("script", str(script), [
                "--input_dir", str(work / "meta"), "--model_size", "7B", "--llama_version", "2",
                "--output_dir", str(work / "hf-transformers")], hwm)
        else:
            label = "meta -> hf, in-memory baseline (torch.load whole + save_file)"
            results[label] = run_child("-c", BASELINE, [str(work / "meta"),
                                                        str(work / "hf-baseline")], hwm)
    startup = results["import only"]["seconds"]
    for label, r in results.items():
        if label != "import only":
            r["seconds_after_startup"] = r["seconds"] - startup
            r["gb_per_s"] = total / 1e9 / max(r["seconds_after_startup"], 1e-9)
    report = {
        "model": f"llama2_7b shape, {args.layers}/32 layers (ratio {args.layers / 32:.3f}), bf16",
        "checkpoint_gb": total / 1e9, "generate_seconds": gen_s,
        "largest_tensor_gb": largest / 1e9,
        "goal_peak_rss_gb": f"import RSS + 2 x {largest / 1e9:.3f} + one output buffer",
        "results": results,
    }
    print(json.dumps(report, indent=1))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
