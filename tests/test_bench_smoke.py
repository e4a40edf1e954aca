"""Smoke tests of the GPU tools on CPU with tiny shapes: the benchmark harness (tools/bench_gpu.py:
both the megallama path, the real Engine with DeepSpeed, and transformers' model run, the table is
printed and one JSON line per variant is written), the one-command GPU check (tools/gpu_check.py
--smoke, with the correctness checks of tools/gpu_parity.py) and the optimizer-kernel bandwidth
tool (tools/bench_optimizer.py, under Triton's interpreter)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

TOOLS = Path(__file__).resolve().parents[1] / "tools"
TOOL = TOOLS / "bench_gpu.py"


def _load(name: str = "bench_gpu"):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
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
        assert r["micro_batches"] == 2 and r["activation_checkpointing"] == "full"
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
    assert (args.layers, args.seq, args.ckpt, args.micro_batches) == (32, 4096, "full", 8)
    assert bench.variants_of(args) == ["ml_fused", "ml_fp8", "ml_fp8_rowwise", "hf_eager"]
    assert {"ml_fp8", "ml_fp8_rowwise"} <= set(bench.COMPILED)
    assert bench.FP8_RECIPE["ml_fp8"] == "tensorwise"
    everything = bench.variants_of(bench.parse_args(["--tiny"]))
    assert "ml_fp8_eager" in everything and "ml_fp8" not in everything  # no compile on CPU
    with pytest.raises(SystemExit):
        bench.parse_args(["--micro-batches", "0"])
    assert bench.parse_args(["--ckpt", "selective"]).ckpt == "selective"
    assert bench.parse_args([]).ckpt == "none"
    with pytest.raises(SystemExit, match="transformers has full checkpointing only"):
        bench.variants_of(bench.parse_args(["--ckpt", "selective", "--variants", "hf_eager"]))


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


def test_bench_optimizer_runs_under_the_interpreter(capsys):
    """tools/bench_optimizer.py imports the kernels from megallama.optim and calls them with their
    current arguments (split master): every configuration prints a line."""
    pytest.importorskip("triton")
    assert _load("bench_optimizer").main(["--device", "cpu", "--numel", "3000", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("adamw_fused BLOCK=") == 12 and out.count("sum_of_squares NORM_BLOCK=") == 4
    assert "torch._fused_adamw_" in out


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny shapes gain nothing from more, and on a loaded 2-core machine a
    second thread's spinning tripled this test's CPU time (measured)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_gpu_check_smoke_runs_every_path(tmp_path, capsys, one_thread):
    """tools/gpu_check.py --smoke --h200: every correctness check passes on the CPU (Triton
    interpreted, FlexAttention forward, FP8 emulated, aot_eager), every benchmark (four megallama
    variants and transformers' at 1 and 2 micro-batches, documents packing, the full-model part
    at tiny shapes) runs with the planner's peak beside it, and so do the sections: the three
    recomputation modes, FP8 with and without the per-step weight casts and compiled, the 7B
    preset's slice against the planner at dp 1 and 8; what needs more GPUs is listed; the JSON
    lines, the .md tables and stdout are written, and no target is judged on a CPU."""
    pytest.importorskip("torchao")
    pytest.importorskip("triton")
    check, parity = _load("gpu_check"), _load("gpu_parity")
    assert check.main(["--smoke", "--h200", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("cpu-*-gpu-check.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert not [r for r in rows if r["kind"] == "section_error"]
    checks = {r["check"]: r for r in rows if r["kind"] == "check"}
    assert list(checks) == list(parity.CHECKS)
    assert all(r["ok"] is True for r in checks.values()), checks
    assert checks["flex_documents"]["causal_only_out_rel_err"] > 0.1  # the mask is in effect
    bench = [r for r in rows if r["kind"] == "bench" and r["section"] == "bench"]
    assert [(r["variant"], r["micro_batches"], r["packing"]) for r in bench] == [
        (v, mb, "concat") for v in (*check.ML, "hf_bf16") for mb in (1,)] + [
        ("ml_fused", 1, "documents")] + [(v, 2, "concat") for v in (*check.ML, "hf_bf16")]
    for r in bench:
        assert r["tokens_per_s"] > 0 and r["compiled"] is False
        assert (r.get("planner_peak_gib", 0) > 0) is r["variant"].startswith("ml_")
    full = [r for r in rows if r["kind"] == "full_model"]
    assert [(r["variant"], r["fits"], r["tokens_per_s"] > 0) for r in full] == [
        ("ml_fused", True, True), ("ml_fp8", True, True)]
    comps = {(r["comparison"], r["micro_batches"]): r for r in rows if r["kind"] == "comparison"}
    assert all(r["met"] is None for r in comps.values())
    assert comps["ml_distributed / ml_fused", 1]["loss_max_abs_diff"] == 0.0  # same update at dp 1
    assert comps["ml_fp8 / ml_fused", 1]["loss_max_abs_diff"] > 0  # FP8 is on
    assert comps["documents / concat", 1]["tokens_per_s_ratio"] > 0
    _check_sections(rows, comps)
    out = capsys.readouterr().out
    assert "== correctness (cpu) ==" in out and f"records appended to {path}" in out
    md = path.with_suffix(".md").read_text()
    for title in ("activation_checkpointing modes", "FP8 tensorwise: per-step weight casts",
                  "llama2_7b_pretrain (distributed, none)", "needs >= 2 GPUs: sp_sequence_linears"):
        assert title in md and title in out, title


def _check_sections(rows: list[dict], comps: dict) -> None:
    """The recompute, fp8cache and preset sections' rows, their comparisons and the list of what
    needs more GPUs, as tools/gpu_check.py --smoke writes them."""
    def section(name):
        return [r for r in rows if r["kind"] == "bench" and r["section"] == name]
    modes = section("recompute")
    assert [(r["variant"], r["activation_checkpointing"]) for r in modes] == [
        ("ml_distributed", m) for m in ("none", "selective", "full")]  # the 7B preset's optimizer
    assert all(r["tokens_per_s"] > 0 and r["planner_peak_gib"] > 0 for r in modes)
    assert [r["planner_recomputed"] > 0 for r in modes] == [False, True, True]
    for mode in ("selective", "full"):  # recomputation changes no loss; the planner's FLOPs beside
        step = comps[f"{mode} / none step time", 2]
        assert step["ratio"] > 0 and step["planner"] > 1 and step["loss_max_abs_diff"] == 0.0
        assert comps[f"{mode} / none peak", 2]["planner"] < 1
    fp8 = {r["variant"]: r for r in section("fp8cache")}
    assert list(fp8) == ["ml_fp8_eager", "ml_fp8_nocache_eager", "ml_fp8"]
    # ml_fp8 runs eager under --smoke, with the cache (compiled, on a GPU: fp8.step_casts)
    assert [fp8[v]["fp8_weight_cache"] for v in fp8] == [True, False, True]
    assert [fp8[v]["compiled"] for v in fp8] == [False, False, False]
    assert all(r["planner_weight_cache_gib"] > 0 for r in fp8.values())
    held = comps["fp8 cache peak - no cache peak (GiB)", 2]
    assert held["planner"] == fp8["ml_fp8_eager"]["planner_weight_cache_gib"]
    assert held["loss_max_abs_diff"] == 0.0  # the cached casts are bit-identical
    assert comps["fp8 no cache / cache step time", 2]["ratio"] > 0
    (preset,) = [r for r in rows if r["kind"] == "preset"]
    assert preset["preset"] == "llama2_7b_pretrain" and preset["measured_in"] == "recompute"
    assert (preset["dp"], preset["optim_impl"]) == (8, "distributed")
    assert preset["planner_slice_dp1_gib"] == modes[0]["planner_peak_gib"]
    assert preset["planner_slice_dp_gib"] < preset["planner_slice_dp1_gib"]
    assert preset["planner_full_preset_gib"] == pytest.approx(72.37, abs=0.01)  # its yaml's plan
    needs = {r["item"]: r for r in rows if r["kind"] == "needs_gpus"}
    assert {"sp_sequence_linears", "partial_grads_once_per_step", "distributed_optimizer_nccl",
            "llama2_70b_pretrain_peak_memory"} <= set(needs)
    assert needs["llama2_70b_pretrain_peak_memory"]["gpus"] == 8
    assert needs["llama2_70b_pretrain_peak_memory"]["planner_full_preset_gib"] == pytest.approx(
        76.72, abs=0.01)


def test_gpu_check_goes_on_after_a_part_fails(tmp_path, monkeypatch, one_thread):
    """A part that raises is recorded (kind section_error, its message and traceback's tail),
    the parts after it still run and the exit status is 1."""
    check = _load("gpu_check")
    sections = check.tool("gpu_check_sections")

    def broken(*args):
        raise RuntimeError("deliberately broken")
    monkeypatch.setattr(sections, "fp8cache_section", broken)
    assert check.main(["--smoke", "--parts", "recompute,fp8cache,preset", "--out-dir",
                       str(tmp_path)]) == 1
    (path,) = tmp_path.glob("cpu-*-gpu-check.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    (err,) = [r for r in rows if r["kind"] == "section_error"]
    assert err["section"] == "fp8cache" and err["error"] == "RuntimeError: deliberately broken"
    assert "deliberately broken" in err["traceback"][-1]
    assert len([r for r in rows if r.get("section") == "recompute"]) >= 3
    assert [r["preset"] for r in rows if r["kind"] == "preset"] == ["llama2_7b_pretrain"]
    assert "SECTION ERROR fp8cache" in path.with_suffix(".md").read_text()


def test_fp8_nocache_variant_casts_every_use(monkeypatch):
    """bench_gpu's ml_fp8_nocache_eager turns the engine's per-step weight casts off: no cast is
    found in the cache during its steps, where ml_fp8_eager finds one for every linear of the
    second micro-batch onwards."""
    pytest.importorskip("torchao")
    from megallama.parallel import fp8

    bench, hits = _load(), []
    real = fp8.cached_cast

    def counting(weight, role):
        found = real(weight, role)
        hits.append(found is not None)
        return found
    monkeypatch.setattr(fp8, "cached_cast", counting)
    argv = ["--tiny", "--steps", "1", "--warmup", "0", "--micro-batches", "2"]
    for variant, expect in (("ml_fp8_eager", True), ("ml_fp8_nocache_eager", False)):
        hits.clear()
        row = bench.measure(variant, argv)
        assert row["fp8_weight_cache"] is expect and hits, row
        assert any(hits) is expect, (variant, sum(hits), len(hits))


def test_child_past_its_timeout_is_an_error_row():
    """A benchmark child that outlives its time (tools/gpu_check.py's budget) is killed and
    reported as an error row, not waited for."""
    bench = _load()
    row = bench.run_child("ml_fused", None, ["--tiny"], timeout=0.05)
    assert row["variant"] == "ml_fused" and row["error"].startswith("killed after ")


def test_gpu_check_full_model_verdict_from_the_planner():
    """The full Llama-2-7B with megallama's fused optimizer: on an 80 GiB card the planner's bytes
    say it does not fit (reported, nothing runs); on an H200's 141 GiB it fits."""
    from megallama.config import preset

    plans = _load("gpu_check_plan")
    h100 = plans.full_model_plan(preset("llama2_7b"), "ml_fused", 4096, 8, 79.2)
    assert h100["fits"] is False and h100["planner_gib"]["total"] > 79.2
    assert h100["not_run"].startswith("does not fit: the planner needs ")
    h200 = plans.full_model_plan(preset("llama2_7b"), "ml_fp8", 4096, 8, 139.8)
    assert h200["fits"] is True and h200["planner_gib"]["total"] <= 139.8


def test_gpu_checks_fail_when_what_they_check_is_off(monkeypatch):
    """The checks can fail: FP8 conversion that converts nothing, and attention that ignores the
    documents, are both reported as failures (ok False), not passed."""
    pytest.importorskip("torchao")
    import torch

    from megallama.model import documents
    from megallama.parallel import fp8

    parity = _load("gpu_parity")
    cpu = torch.device("cpu")
    monkeypatch.setattr(fp8, "convert_to_float8", lambda module, *a, **k: 2)
    assert parity.run_check("fp8_tensorwise", cpu, True)["ok"] is False
    monkeypatch.setattr(documents, "document_attention", lambda q, k, v, segments, kernel="auto":
                        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert parity.run_check("flex_documents", cpu, True)["ok"] is False
