"""The lm-eval model ``megallama`` scores like lm-eval's ``hf`` model on the HF export of the same
checkpoint: a tiny Llama with the real Llama 2 tokenizer, three local tasks (multiple choice with
one- and many-token choices, perplexity by rolling windows over texts with leading spaces, runs of
spaces and more tokens than the context, greedy generation with stop sequences and from a
prompt longer than the context), log-likelihoods within 1e-4, equal accuracies, equal is_greedy
(continuations greedy throughout, and greedy only in their first token) and equal generated
text; the model's format=hf path agrees too. lm-eval, accelerate and the Llama 2 tokenizer are
required through the project's rule (tests/conftest.py: skipped locally when absent, a failure
with MEGALLAMA_REQUIRE_ASSETS=1).
The tp=2 x pp=2 run under torchrun is in
tests/distributed/test_lm_eval_tp.py (it reuses the fixtures here)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only (before huggingface_hub loads)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tests.conftest import (  # noqa: E402
    require_llama3_tokenizer,
    require_llama_tokenizer,
    require_module,
)

require_module("lm_eval")
require_module("accelerate")  # lm-eval's hf model

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import megallama.inference.harness  # noqa: E402,F401  (registers the model "megallama")
from megallama.config import preset  # noqa: E402
from megallama.interop.convert import convert  # noqa: E402
from megallama.model.llama import Transformer  # noqa: E402
from tests.test_generate import hf_model_from  # noqa: E402

TOL = 1e-4
TASKS = ["megallama_mc", "megallama_ll", "megallama_ppl", "megallama_gen_stop",
         "megallama_gen_long"]

MC = [
    {"question": "What color is a clear sky at noon?", "choices": ["blue", "green", "bright red"],
     "answer": 0},
    {"question": "Is water wet?", "choices": ["yes", "no"], "answer": 0},
    {"question": "Is fire cold?", "choices": ["yes", "no"], "answer": 1},
    {"question": "Which number is  largest?", "choices": ["3", "17", "one hundred and four"],
     "answer": 2},
    {"question": "Pick the code:", "choices": ["def f(x):\n    return x", "print( 'hi' )"],
     "answer": 0},
]
PPL = [
    {"text": " = Valkyria Chronicles III = \n Senjō no Valkyria 3 : Unrecorded Chronicles "
             "( Japanese : 戦場のヴァルキュリア3 ) is a tactical role @-@ playing game ."},
    {"text": "def f(x):\n    if x  >  0:\n        return  x * 2\n    return -x\n"},
    {"text": " ".join(["The quick brown fox jumps over the lazy dog, then naps in the sun."] * 12)},
    {"text": "<s> A text that already starts with the BOS string."},
    {"text": "a"},
]
# targets: most are the start of the seed-7 model's greedy continuation (is_greedy true)
GEN = [
    {"prompt": "The capital of France is", "target": "Prefix"},
    {"prompt": "Once upon a time", "target": "CN"},
    {"prompt": "1, 2, 3,", "target": "cookie"},
    {"prompt": "  An indented prompt:", "target": "pré"},
    {"prompt": "Q: Why?\nA:", "target": "Because"},
    {"prompt": "", "target": "Hello"},  # empty context: the prefix (BOS) token conditions
    # more tokens than the context of 64: generation keeps the last max_length - max_gen_toks
    {"prompt": " ".join(["The quick brown fox jumps over the lazy dog."] * 6), "target": "fox"},
]
# log-likelihood requests (the continuation follows the context directly): the above, and
# continuations of two tokens whose first token is the greedy one ("Prefix", "CN": documents 0
# and 1): greedy throughout ("Prefixciendo"), or only in the first token, where is_greedy must be
# False
LL = [*GEN,
      {"prompt": "The capital of France is", "target": "Prefixciendo"},
      {"prompt": "The capital of France is", "target": "Prefix garden"},
      {"prompt": "Once upon a time", "target": "CN tower"}]
PARTLY_GREEDY = {len(LL) - 2, len(LL) - 1}  # doc ids in megallama_ll


def _task(name: str, data: Path, **fields: Any) -> dict[str, Any]:
    return {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test", **fields}


def write_tasks(root: Path) -> Path:
    """Task YAMLs (JSON is YAML) over local JSONL files, for TaskManager(include_path=root)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, docs in (("mc", MC), ("ppl", PPL), ("gen", GEN), ("ll", LL)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    gen = {"output_type": "generate_until", "doc_to_text": "{{prompt}}",
           "doc_to_target": "{{target}}", "metric_list": [{"metric": "exact_match"}]}
    tasks = [
        _task("megallama_mc", root / "mc.jsonl", output_type="multiple_choice",
              doc_to_text="Question: {{question}}\nAnswer:", doc_to_choice="{{choices}}",
              doc_to_target="{{answer}}",
              metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}]),
        _task("megallama_ll", root / "ll.jsonl", output_type="loglikelihood",
              doc_to_text="{{prompt}}", doc_to_target="{{target}}",
              metric_list=[{"metric": "perplexity"}, {"metric": "acc"}]),
        _task("megallama_ppl", root / "ppl.jsonl", output_type="loglikelihood_rolling",
              doc_to_text="", doc_to_target="{{text}}",
              metric_list=[{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                           {"metric": "bits_per_byte"}]),
        # random weights: "e" and a newline come soon, so this one stops early, mid-batch
        _task("megallama_gen_stop", root / "gen.jsonl", **gen,
              generation_kwargs={"until": ["e", "\n"], "max_gen_toks": 12, "do_sample": False}),
        _task("megallama_gen_long", root / "gen.jsonl", **gen,
              generation_kwargs={"until": ["\n\n\n"], "max_gen_toks": 10, "do_sample": False}),
    ]
    for t in tasks:
        (root / f"{t['task']}.yaml").write_text(json.dumps(t, indent=1) + "\n")
    return root


@pytest.fixture(scope="session")
def lm_eval_setup(tmp_path_factory) -> dict[str, Path]:
    return build_setup(tmp_path_factory.mktemp("lm_eval"))


def build_setup(root: Path) -> dict[str, Path]:
    """A tiny GQA Llama (vocab 32000, context 64: long texts take several rolling windows) saved
    as megallama (tp=2 layout), and its HF export with tokenizer files; the local tasks. The
    Llama 2 tokenizer is required through the project's rule (skip, or fail in CI)."""
    llama_tokenizer_path = require_llama_tokenizer()
    cfg = preset("tiny_gqa", vocab_size=32000, n_layers=2, max_seq_len=64)
    hf_model_from(Transformer(cfg, seed=7).eval()).save_pretrained(root / "src")
    convert(f"hf:{root / 'src'}", f"megallama:{root / 'mg'}", tp=2, tokenizer=llama_tokenizer_path,
            progress=False)
    convert(f"megallama:{root / 'mg'}", f"hf:{root / 'hf'}", tokenizer=llama_tokenizer_path,
            progress=False)
    return {"megallama": root / "mg", "hf": root / "hf", "tasks": write_tasks(root / "tasks")}


@functools.cache
def task_manager(tasks_dir: Path) -> TaskManager:
    """One index of lm-eval's tasks (thousands of YAMLs: seconds to build) per tasks folder."""
    return TaskManager(include_path=str(tasks_dir))


def evaluate(model: str, model_args: dict[str, Any], tasks_dir: Path,
             batch_size: int = 3, tasks: list[str] = TASKS) -> dict[str, Any]:
    return simple_evaluate(model=model, model_args=model_args, tasks=tasks,
                           task_manager=task_manager(tasks_dir),
                           batch_size=batch_size, device="cpu", log_samples=True,
                           bootstrap_iters=0)


def hf_reference(setup: dict[str, Path], tasks: list[str] = TASKS) -> dict[str, Any]:
    """lm-eval's own ``hf`` model on the HF export (fp32, on the CPU)."""
    return evaluate("hf", {"pretrained": str(setup["hf"]), "dtype": "float32"}, setup["tasks"],
                    batch_size=2, tasks=tasks)


def _plain(value: Any) -> Any:
    """A response as the samples files of a command-line run hold it: tuples as lists, numbers
    and booleans as strings; read back alike from either source."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bool | float):
        value = str(value)
    if value in ("True", "False"):
        return value == "True"
    try:
        return float(value)
    except ValueError:
        return value


def responses(results: dict[str, Any]) -> dict[str, dict[int, list]]:
    """Per task, per document: the model's answers (log-likelihoods / texts)."""
    return {task: {s["doc_id"]: _plain(s["resps"]) for s in samples}
            for task, samples in results["samples"].items()}


def assert_same_scores(ours: dict[str, Any], ref: dict[str, Any],
                       tasks: list[str] = TASKS) -> float:
    """Equal metrics (acc exactly, perplexities within TOL relative) and per-request answers;
    returns the largest log-likelihood difference seen."""
    worst = 0.0
    a, b = responses(ours), responses(ref)
    assert a.keys() == b.keys() == set(tasks)
    for task in tasks:
        assert a[task].keys() == b[task].keys(), task
        for doc, resps in b[task].items():
            for mine, theirs in zip(a[task][doc], resps, strict=True):
                if task.startswith("megallama_gen"):
                    assert mine == theirs, (task, doc, mine, theirs)
                    continue
                pair = task != "megallama_ppl"  # (log-likelihood, is_greedy) or a number
                ll_a, ll_b = (mine[0][0], theirs[0][0]) if pair else (mine[0], theirs[0])
                worst = max(worst, abs(ll_a - ll_b))
                assert abs(ll_a - ll_b) < TOL, (task, doc, ll_a, ll_b)
                if pair:
                    assert mine[0][1] == theirs[0][1], (task, doc, "is_greedy")
        for key, value in ref["results"][task].items():
            if isinstance(value, float) and "stderr" not in key:
                assert ours["results"][task][key] == pytest.approx(value, rel=TOL, abs=TOL), (task, key)
    return worst


def assert_data_covers_the_cases(ref: dict[str, Any], setup: dict[str, Path]) -> None:
    """The data holds what the comparison relies on, by lm-eval's ``hf`` model: continuations of
    several tokens that are greedy throughout and only in their first token (is_greedy computed
    with any() instead of all() would pass otherwise), and a generation prompt longer than the
    context (a prompt not truncated to leave room for the new tokens would pass otherwise)."""
    import transformers

    greedy = {doc: r[0][0][1] for doc, r in responses(ref)["megallama_ll"].items()}
    assert greedy[0] and greedy[1] and greedy[len(LL) - 3], greedy  # greedy throughout
    assert not any(greedy[doc] for doc in PARTLY_GREEDY), greedy
    tok = transformers.AutoTokenizer.from_pretrained(str(setup["hf"]))
    for doc in (len(LL) - 3, *PARTLY_GREEDY):
        context, whole = (tok.encode(LL[doc]["prompt"]),
                          tok.encode(LL[doc]["prompt"] + LL[doc]["target"]))
        assert len(whole) - len(context) == 2, LL[doc]  # two tokens, the first greedy
    assert len(tok.encode(GEN[-1]["prompt"])) > 64  # the model's context


def test_scores_match_hf_backend(lm_eval_setup) -> None:
    ref = hf_reference(lm_eval_setup)
    assert_data_covers_the_cases(ref, lm_eval_setup)
    ours = evaluate("megallama", {"checkpoint": str(lm_eval_setup["megallama"]), "tp": 1},
                    lm_eval_setup["tasks"])
    worst = assert_same_scores(ours, ref)
    via_hf = evaluate("megallama", {"checkpoint": str(lm_eval_setup["hf"]), "format": "hf"},
                      lm_eval_setup["tasks"], batch_size=4)
    worst = max(worst, assert_same_scores(via_hf, ref))
    print(f"largest |loglikelihood(megallama) - loglikelihood(hf)|: {worst:.2e}")
    assert ours["config"]["model"] == "megallama" and ours["config"]["tp"] == 1
    gen = responses(ours)["megallama_gen_stop"]
    assert all("e" not in r[0] and "\n" not in r[0] for r in gen.values())


# Llama 3: tiktoken text, its BOS as the prefix of rolling windows and empty contexts, stop strings
LLAMA3_TASKS = ["megallama_mc", "megallama_ll", "megallama_ppl", "megallama_gen_stop"]


def test_llama3_scores_match_hf_backend(lm_eval_setup, tmp_path_factory) -> None:
    """The same comparison on a Llama-3-shaped checkpoint: tiny_llama3 (GQA, llama3 RoPE scaling,
    128,256 ids) with Meta's tiktoken tokenizer, saved as megallama at tp 2, against lm-eval's
    ``hf`` model on its HF export (tokenizer.json written from the tiktoken file). The tasks
    folder (and its index) is the Llama 2 test's."""
    tokenizer = require_llama3_tokenizer()
    root = tmp_path_factory.mktemp("lm_eval_llama3")
    cfg = preset("tiny_llama3", n_layers=2, max_seq_len=64)
    hf_model_from(Transformer(cfg, seed=7).eval()).save_pretrained(root / "src")
    convert(f"hf:{root / 'src'}", f"megallama:{root / 'mg'}", tp=2, tokenizer=tokenizer,
            progress=False)
    convert(f"megallama:{root / 'mg'}", f"hf:{root / 'hf'}", tokenizer=tokenizer, progress=False)
    setup = {"hf": root / "hf", "tasks": lm_eval_setup["tasks"]}
    ref = hf_reference(setup, LLAMA3_TASKS)
    ours = evaluate("megallama", {"checkpoint": str(root / "mg"), "tp": 1}, setup["tasks"],
                    tasks=LLAMA3_TASKS)
    worst = assert_same_scores(ours, ref, LLAMA3_TASKS)
    print(f"Llama 3: largest |loglikelihood(megallama) - loglikelihood(hf)|: {worst:.2e}")


def test_bad_arguments_fail_clearly(lm_eval_setup) -> None:
    from megallama.config import ConfigError
    from megallama.inference.harness import MegallamaLM

    with pytest.raises(ConfigError, match=r"tp=2 \* pp=1 = 2 does not equal the world size 1"):
        MegallamaLM(checkpoint=str(lm_eval_setup["megallama"]), tp=2, device="cpu")
    with pytest.raises(ConfigError, match="no 'auto'"):
        MegallamaLM(checkpoint=str(lm_eval_setup["megallama"]), batch_size="auto")


@pytest.mark.parametrize("required", [False, True], ids=["local", "ci"])
def test_missing_tokenizer_follows_the_asset_rule(required: bool, tmp_path: Path,
                                                  monkeypatch) -> None:
    """Without the Llama 2 tokenizer the setup skips, or fails when MEGALLAMA_REQUIRE_ASSETS=1
    (the project's rule, tests/conftest.py), before building anything."""
    import tests.conftest as conftest

    monkeypatch.setattr(conftest, "LLAMA_TOKENIZER", Path("/nonexistent/tokenizer.model"))
    monkeypatch.setattr(conftest, "REQUIRE_ASSETS", required)
    expected = pytest.fail.Exception if required else pytest.skip.Exception
    try:  # a skip must not escape: it would report this test as skipped, not failed
        build_setup(tmp_path)
    except (pytest.skip.Exception, pytest.fail.Exception) as outcome:
        assert type(outcome) is expected, f"{type(outcome).__name__}: {outcome}"
        assert "not found at /nonexistent" in str(outcome), outcome
    else:
        pytest.fail("the setup ran without the tokenizer")
    assert not any(tmp_path.iterdir())
