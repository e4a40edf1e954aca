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


def test_tiny_bench_runs_on_cpu(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "bench.jsonl"
    rc = bench.main(["--tiny", "--variants", "ml_base,ml_eager,ml_fused_eager,hf_eager", "--steps", "1",
                     "--out", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["ml_base", "ml_eager", "ml_fused_eager", "hf_eager"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["step_ms_median"] > 0 and r["flops_per_token"] > 0
        assert len(r["losses"]) == r["warmup"] + r["steps_timed"]
    # the optimised megallama path computes the same losses as the first one (fp32-exact on CPU
    # up to bf16 rounding of the model)
    assert rows[1]["loss_max_abs_diff_vs_base"] < 1e-2
    assert rows[2]["loss_max_abs_diff_vs_base"] < 1e-2  # megallama's fused optimizer
    assert "tokens/s" in capsys.readouterr().out
