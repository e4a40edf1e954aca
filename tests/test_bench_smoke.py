"""Smoke test of the GPU benchmark harness (tools/bench_gpu.py) on CPU with tiny shapes: both the
megallama path (the real Engine, DeepSpeed included) and transformers' model run, the table is
printed and one JSON line per variant is written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_gpu", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Tolerances on the per-step losses against ml_base, from measurement (CPU, torch 2.x): the
# model runs in bf16 (the tool fixes trainer.precision=bf16), so the comparison is about what
# each variant changes, not about bf16 resolution (2**-5 at a loss of 6):
# * ml_eager (chunked cross-entropy, immediate_grad_update, no dp=1 all-reduce) reorders fp32
#   sums only: measured 0.0 over 4 steps; 1e-4 leaves room for another BLAS's summation order.
# * ml_fused_eager (megallama's optimizer: its own fp32 master split over the bf16 weight, which
#   rounds ties away from zero, vs DeepSpeed's bf16 optimizer): measured 1.4e-4 over 4 steps,
#   from a few weights one bf16 ulp apart; 1e-3 is 7x that.
# Both are far below what one optimizer step moves the loss (the same batch comes back every
# 2 steps and its loss has dropped by ~0.28 at step 2), which MIN_LEARNING asserts, so a variant
# whose update is missing, doubled or mis-scaled cannot stay within them.
EAGER_TOL, FUSED_TOL, MIN_LEARNING = 1e-4, 1e-3, 0.1


def test_tiny_bench_runs_on_cpu(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "bench.jsonl"
    # --steps 3: 1 warmup + 3 timed = 4 optimizer steps (the most --tiny runs), so three updates
    # are seen in the losses, each batch twice (the tool cycles 2 batches)
    rc = bench.main(["--tiny", "--variants", "ml_base,ml_eager,ml_fused_eager,hf_eager", "--steps", "3",
                     "--out", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["ml_base", "ml_eager", "ml_fused_eager", "hf_eager"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["step_ms_median"] > 0 and r["flops_per_token"] > 0
        assert len(r["losses"]) == r["warmup"] + r["steps_timed"] == 4
    base = rows[0]["losses"]
    assert base[0] - base[2] > MIN_LEARNING and base[1] - base[3] > MIN_LEARNING, base
    # the optimised megallama paths compute the same losses as the first one, step by step
    for row, tol in ((rows[1], EAGER_TOL), (rows[2], FUSED_TOL)):  # rows[2]: the fused optimizer
        diffs = [abs(a - b) for a, b in zip(row["losses"], base, strict=True)]
        assert max(diffs) == row["loss_max_abs_diff_vs_base"]
        assert max(diffs) < tol, f"{row['variant']}: |loss - ml_base| per step {diffs} (tol {tol})"
    assert "tokens/s" in capsys.readouterr().out


# ml_fp8_eager (torchao emulated on CPU) against its bf16 twin ml_fused_eager on the same steps:
# measured 1.8e-3 per step at a loss of ~6.3 (FP8's own error: far below what a step moves the
# loss, MIN_LEARNING, and nonzero, which shows FP8 is on)
FP8_TOL = 0.02


def test_tiny_bench_fp8_micro_batches_and_checkpointing_on_cpu(tmp_path):
    bench = _load()
    out = tmp_path / "bench.jsonl"
    rc = bench.main(["--tiny", "--variants", "ml_fused_eager,ml_fp8_eager,hf_eager", "--steps", "3",
                     "--micro-batches", "2", "--ckpt", "--out", str(out)])
    assert rc == 0
    rows = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    for r in rows.values():
        assert r["micro_batches"] == 2 and r["activation_checkpointing"] is True
        # tokens/s counts both micro-batches of a step
        assert r["tokens_per_s"] == pytest.approx(2 * 64 / (r["step_ms_median"] / 1e3))
        assert r["losses"][0] - r["losses"][2] > MIN_LEARNING, r["losses"]
    bf16, fp8 = rows["ml_fused_eager"]["losses"], rows["ml_fp8_eager"]["losses"]
    diffs = [abs(a - b) for a, b in zip(fp8, bf16, strict=True)]
    assert 0 < max(diffs) < FP8_TOL, diffs  # FP8 is on, and learns as bf16 does


def test_full_7b_arguments_and_variants():
    """The GPU commands of docs/PERFORMANCE.md's FP8 section parse into the runs they name."""
    bench = _load()
    args = bench.parse_args(["--layers", "32", "--ckpt", "--micro-batches", "8",
                             "--variants", "ml_fused,ml_fp8,ml_fp8_rowwise,hf_eager"])
    assert (args.layers, args.seq, args.ckpt, args.micro_batches) == (32, 4096, True, 8)
    assert bench.variants_of(args) == ["ml_fused", "ml_fp8", "ml_fp8_rowwise", "hf_eager"]
    assert {"ml_fp8", "ml_fp8_rowwise"} <= set(bench.COMPILED)
    assert bench.FP8_RECIPE["ml_fp8"] == "tensorwise"
    everything = bench.variants_of(bench.parse_args(["--tiny"]))
    assert "ml_fp8_eager" in everything and "ml_fp8" not in everything  # no compile on CPU
    with pytest.raises(SystemExit):
        bench.parse_args(["--micro-batches", "0"])


def test_tiny_bench_with_document_packing(tmp_path):
    """``--packing documents`` (the GPU comparison of document-masked vs plain causal attention):
    the megallama variant trains on packed documents, the segments reaching the model."""
    bench = _load()
    out = tmp_path / "bench.jsonl"
    rc = bench.main(["--tiny", "--variants", "ml_fused_eager", "--steps", "3", "--packing",
                     "documents", "--doc-len", "8", "--out", str(out)])
    assert rc == 0
    row = json.loads(out.read_text().splitlines()[0])
    assert row["losses"][0] - row["losses"][2] > MIN_LEARNING, row["losses"]
    data = bench.batches(bench.parse_args(["--tiny", "--packing", "documents", "--doc-len", "8"]),
                         "cpu")
    tokens, labels, segments = data[0]
    starts_inside = int((segments[:, 1:] != segments[:, :-1]).sum())  # label t -> token t + 1
    assert segments.max() > 2 and int((labels == -100).sum()) in (starts_inside, starts_inside + 1)
