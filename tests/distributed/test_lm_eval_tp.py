"""``python -m megallama.lm_eval`` under torchrun at tp=2 x pp=2 (four gloo ranks on the CPU): the
command users run. Every rank runs every request (TP and PP collectives), only global rank 0
prints and writes results, and the scores equal lm-eval's ``hf`` model on the HF export of the
same checkpoint: log-likelihoods within 1e-4, equal accuracies, equal greedy text. One launch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.distributed.cli import torchrun
from tests.test_lm_eval_harness import (
    TASKS,
    assert_same_scores,
    hf_reference,
    lm_eval_setup,  # noqa: F401  (the fixture)
)

pytestmark = pytest.mark.slow


def _read_output(out: Path) -> dict[str, Any]:
    """The results file and samples files lm-eval wrote, as simple_evaluate returns them."""
    results = sorted(out.rglob("results_*.json"))
    assert len(results) == 1, f"expected one results file (global rank 0 only), got {results}"
    written = json.loads(results[0].read_text())
    samples = {}
    for task in TASKS:
        files = sorted(out.rglob(f"samples_{task}_*.jsonl"))
        assert len(files) == 1, (task, files)
        samples[task] = [json.loads(line) for line in files[0].read_text().splitlines()]
    return {"results": written["results"], "samples": samples, "config": written["config"]}


def test_cli_tp2_pp2_matches_hf_backend(lm_eval_setup, tmp_path) -> None:  # noqa: F811
    out = tmp_path / "out"
    args = ["--model", "megallama",
            "--model_args", f"checkpoint={lm_eval_setup['megallama']},tp=2,pp=2",
            "--tasks", ",".join(TASKS), "--include_path", str(lm_eval_setup["tasks"]),
            "--device", "cpu", "--batch_size", "3",
            "--output_path", str(out), "--log_samples"]
    proc, seconds = torchrun(4, "megallama.lm_eval", args, timeout=900,
                             env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ours = _read_output(out)
    assert ours["config"]["model"] == "megallama"
    assert (ours["config"]["tp"], ours["config"]["pp"]) == (2, 2)
    assert proc.stdout.count("|megallama_mc") == 1, proc.stdout  # one results table
    worst = assert_same_scores(ours, hf_reference(lm_eval_setup))
    print(f"tp=2 pp=2 ({seconds:.0f} s): largest |loglikelihood difference| vs hf {worst:.2e}")
