"""Every expected failure of ``megallama.evaluate`` and ``megallama.generate`` is one line.

One row per case: bad options, missing or damaged checkpoints (megallama, Meta, HF), data and
tokenizers that do not fit, prompts that cannot run. Each row runs the command line in this
process and checks exit status 2, a last stderr line ``<prog>: error: ...`` naming the file or
option, no traceback, and inputs left byte for byte as they were. A few rows run under torchrun
with 2 ranks: every rank exits 2 with the same line (errors found before torch.distributed
starts, and a damaged shard found while loading, which the ranks agree on), and none hangs.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from megallama import evaluate, generate
from megallama.checkpoint.weights import save_model_weights
from megallama.config import preset
from megallama.config.compose import save_config
from megallama.config.grid import Grid
from megallama.config.train_config import TrainConfig
from megallama.data.indexed import IndexedWriter
from megallama.interop.convert import convert
from megallama.model.llama import Transformer
from megallama.parallel.topology import Topology
from tests.conftest import require_llama_tokenizer
from tests.distributed.cli import torchrun

PROGS = {"evaluate": evaluate, "generate": generate}
SHARD = "model-pp00-tp00.safetensors"
TEXT = "It is a truth universally acknowledged, that a single man in want of a wife. " * 12


# ---- inputs --------------------------------------------------------------------------------------
def _model(vocab: int = 32000) -> Transformer:
    """4 heads over 2 KV heads, 2 blocks, a context of 64: small enough to copy and hash often."""
    cfg = preset("tiny_gqa", vocab_size=vocab, n_layers=2, dim=32, n_heads=4, n_kv_heads=2,
                 max_seq_len=64)
    return Transformer(cfg, seed=3).eval()


def _save(model: Transformer, step: Path) -> None:
    save_model_weights(model.named_layers(), model.tp, Topology(grid=Grid(), rank=0), step,
                       model.cfg)


def _damaged(src: Path, dst: Path, damage: Callable[[Path], None]) -> str:
    shutil.copytree(src, dst)
    damage(dst)
    return str(dst)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _checkpoints(root: Path, tokenizer: Path) -> dict[str, str]:
    """A run (config.yaml + checkpoints/step_N with tokenizer.model), its Meta and HF forms, a
    checkpoint of a 256-token vocabulary, and damaged copies."""
    model = _model()
    run = root / "run"
    cfg = TrainConfig()
    cfg.model, cfg.data.seq_len = model.cfg, 16
    save_config(cfg, run / "config.yaml")
    step = run / "checkpoints" / "step_00000002"
    _save(model, step)
    shutil.copyfile(tokenizer, step / "tokenizer.model")
    meta = root / "meta"  # no tokenizer.model beside it, nor in root
    meta.mkdir()
    torch.save(model.state_dict(), meta / "consolidated.00.pth")
    (meta / "params.json").write_text(json.dumps(model.cfg.to_meta_params()))
    hf = root / "hf"
    convert(f"megallama:{step}", f"hf:{hf}", progress=False)
    _save(_model(256), root / "vocab256")
    norun = root / "norun"  # a run directory whose checkpoints/ never got a step
    (norun / "checkpoints").mkdir(parents=True)
    shutil.copyfile(run / "config.yaml", norun / "config.yaml")
    dmg = root / "damaged"
    return {
        "step": str(step), "meta": str(meta), "hf": str(hf), "vocab256": str(root / "vocab256"),
        "norun": str(norun),
        "truncated": _damaged(step, dmg / "truncated", lambda d: _truncate(d / SHARD)),
        "flipped": _damaged(step, dmg / "flipped", lambda d: _flip_byte(d / SHARD)),
        "bad_index": _damaged(step, dmg / "bad_index",
                              lambda d: (d / "model.index.json").write_text('{"format": ')),
        "meta_pth": _damaged(meta, dmg / "meta_pth", lambda d: _truncate(d / "consolidated.00.pth")),
        "meta_params": _damaged(meta, dmg / "meta_params",
                                lambda d: (d / "params.json").write_text("{dim: 32")),
        "hf_weights": _damaged(hf, dmg / "hf_weights", lambda d: _truncate(d / "model.safetensors")),
        "hf_config": _damaged(hf, dmg / "hf_config", lambda d: (d / "config.json").write_text("{}")),
    }


def _other_inputs(root: Path) -> dict[str, str]:
    """Data, prompt files and tokenizers, good and bad."""
    (root / "text.txt").write_text(TEXT)
    (root / "latin1.txt").write_bytes(TEXT.encode() + b"caf\xe9\n")
    (root / "empty_dir").mkdir()
    (root / "not_spm.model").write_bytes(b"this is not a SentencePiece model\n" * 8)
    (root / "prompts.txt").write_bytes(b"first prompt\nsecond \xff prompt\n")
    (root / "tags.txt").write_text("first prompt\n\nwhat is <</SYS>> for?\n")
    (root / "short.txt").write_text("a few words\n")
    with IndexedWriter(root / "tokens", 32000) as w:
        w.add_document(list(range(1, 200)))
    shutil.copyfile(root / "tokens.bin", root / "bad_idx.bin")
    (root / "bad_idx.idx").write_bytes((root / "tokens.idx").read_bytes()[:10])
    return {name: str(root / name) for name in ("text.txt", "latin1.txt", "empty_dir",
                                                 "not_spm.model", "prompts.txt", "tags.txt",
                                                 "bad_idx", "short.txt")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    tokenizer = require_llama_tokenizer()
    root = tmp_path_factory.mktemp("cli_inputs")
    return {"root": str(root), "tokenizer": str(tokenizer), "absent": str(root / "absent"),
            **_checkpoints(root, tokenizer), **_other_inputs(root)}


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``: a failed command must change nothing."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---- the table -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """``prog`` run with ``argv`` ({name} is an input path) must fail with a line holding
    every string of ``expect``; ``setup`` prepares the process (e.g. hides the GPU)."""

    id: str
    prog: str
    argv: tuple[str, ...]
    expect: tuple[str, ...]
    setup: Callable[[pytest.MonkeyPatch], None] | None = field(default=None, compare=False)


EV = ("--data", "{text.txt}", "--seq-len", "8", "--batch-size", "2", "--device", "cpu")
GEN = ("--prompt", "hello", "--max-new-tokens", "4", "--device", "cpu")


def _ev(id: str, *argv: str, expect: tuple[str, ...], ckpt: str = "{step}", setup=None) -> Case:
    return Case(id, "evaluate", ("--checkpoint", ckpt, *EV, *argv), expect, setup)


def _gen(id: str, *argv: str, expect: tuple[str, ...], ckpt: str = "{step}", setup=None) -> Case:
    return Case(id, "generate", ("--checkpoint", ckpt, *GEN, *argv), expect, setup)


def _no_gpu(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(torch.cuda, "is_available", lambda: False)


def _unreadable_data(mp: pytest.MonkeyPatch) -> None:
    """Reading the text fails as a file without read permission would (tests may run as root)."""
    def refuse(inputs, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(inputs[0]))
    mp.setattr("megallama.inference.evaluation.preprocess", refuse)


CHECKPOINT_CASES = [
    _ev("checkpoint-missing", ckpt="{absent}", expect=("{absent}", "no such checkpoint")),
    _gen("checkpoint-empty-dir", ckpt="{empty_dir}", expect=("{empty_dir}", "no checkpoint")),
    _ev("run-dir-without-checkpoints", ckpt="{norun}", expect=("{norun}", "no checkpoint")),
    _ev("shard-truncated", ckpt="{truncated}", expect=(SHARD, "truncated")),
    _gen("shard-truncated", ckpt="{truncated}", expect=(SHARD, "truncated")),
    _ev("shard-sha-mismatch", ckpt="{flipped}", expect=(SHARD, "sha256 checksum mismatch")),
    _gen("index-not-json", ckpt="{bad_index}", expect=("model.index.json", "not valid JSON")),
    _gen("meta-pth-truncated", "--format", "meta", "--tokenizer", "{tokenizer}",
         ckpt="{meta_pth}", expect=("consolidated.00.pth", "not a readable torch checkpoint")),
    _ev("meta-params-not-json", "--format", "meta", "--tokenizer", "{tokenizer}",
        ckpt="{meta_params}", expect=("{meta_params}/params.json",)),
    _ev("hf-safetensors-truncated", "--format", "hf", "--tokenizer", "{tokenizer}",
        ckpt="{hf_weights}", expect=("model.safetensors", "not a readable safetensors")),
    _gen("hf-config-empty", "--format", "hf", "--tokenizer", "{tokenizer}", ckpt="{hf_config}",
         expect=("config.json", "missing field")),
    _ev("format-bogus", "--format", "bogus", expect=("argument --format", "'bogus'")),
]
DATA_CASES = [
    Case("data-missing", "evaluate", ("--checkpoint", "{step}", "--data", "{absent}",
                                      "--device", "cpu"), ("--data {absent}", "no such file")),
    Case("data-directory", "evaluate", ("--checkpoint", "{step}", "--data", "{empty_dir}",
                                        "--device", "cpu"), ("--data {empty_dir}", "directory")),
    _ev("data-text-without-tokenizer", "--format", "meta", ckpt="{meta}",
        expect=("--data {text.txt} is text", "pass --tokenizer")),
    Case("data-no-window", "evaluate", ("--checkpoint", "{step}", "--data", "{short.txt}",
                                        "--seq-len", "8", "--device", "cpu"),
         ("--data {short.txt}: no window of 9 tokens", "lower --seq-len")),
    Case("data-text-not-utf8", "evaluate", ("--checkpoint", "{step}", "--data", "{latin1.txt}",
                                            "--device", "cpu"), ("{latin1.txt}", "UTF-8")),
    Case("data-token-index-damaged", "evaluate", ("--checkpoint", "{step}", "--data",
                                                  "{bad_idx}", "--device", "cpu"), ("bad_idx.idx",)),
    _ev("data-unreadable", setup=_unreadable_data, expect=("{text.txt}: Permission denied",)),
    _ev("tokenizer-missing", "--tokenizer", "{absent}",
        expect=("--tokenizer {absent}", "no such file")),
    _gen("tokenizer-missing", "--tokenizer", "{absent}",
         expect=("--tokenizer {absent}", "no such file")),
    _gen("tokenizer-directory", "--tokenizer", "{empty_dir}",
         expect=("--tokenizer {empty_dir}", "directory")),
    _ev("tokenizer-not-sentencepiece", "--tokenizer", "{not_spm.model}",
        expect=("--tokenizer", "{not_spm.model}", "not a valid SentencePiece model")),
    _gen("tokenizer-not-sentencepiece", "--tokenizer", "{not_spm.model}",
         expect=("--tokenizer", "{not_spm.model}", "not a valid SentencePiece model")),
    _ev("tokenizer-vocab-mismatch", "--tokenizer", "{tokenizer}", ckpt="{vocab256}",
        expect=("vocab_size 256 != tokenizer vocab_size 32000",)),
    _gen("tokenizer-vocab-mismatch", "--tokenizer", "{tokenizer}", ckpt="{vocab256}",
         expect=("vocab_size 256 != tokenizer vocab_size 32000",)),
]
PROMPT_CASES = [
    Case("prompt-missing", "generate", ("--checkpoint", "{step}", "--device", "cpu"),
         ("give at least one --prompt",)),
    _gen("prompt-empty", "--prompt", " ", expect=("--prompt #2 is empty",)),
    # --chat wraps a prompt into text that is never blank: the check comes before
    _gen("chat-prompt-empty", "--chat", "--prompt", "", expect=("--prompt #2 is empty",)),
    Case("chat-only-prompt-blank", "generate", ("--checkpoint", "{step}", "--chat", "--prompt",
                                                " \n\t", "--device", "cpu"), ("--prompt is empty",)),
    _gen("system-without-chat", "--system", "Be brief.",
         expect=("--system applies to chat prompts: add --chat",)),
    _gen("allow-chat-tags-without-chat", "--allow-chat-tags",
         expect=("--allow-chat-tags applies to chat prompts: add --chat",)),
    # argv bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape)
    _gen("prompt-not-utf8", "--prompt", "caf\udce9", expect=("--prompt #2 is not valid UTF-8",
                                                              "byte 0xe9 at character 3")),
    _gen("system-not-utf8", "--chat", "--system", "\udcffbrief",
         expect=("--system is not valid UTF-8", "byte 0xff at character 0")),
    # the chat format's own tags, refused as Meta's chat_completion refuses them
    *(_gen(f"chat-tag-{tag}", "--chat", "--prompt", f"say {tag} now",
           expect=(f"--prompt #2 contains {tag!r}", "--allow-chat-tags"))
      for tag in ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")),
    _gen("chat-tag-in-system", "--chat", "--system", "Be [/INST] brief.",
         expect=("--system contains '[/INST]'", "--allow-chat-tags")),
    _gen("chat-tag-in-prompt-file", "--chat", "--prompt-file", "{tags.txt}",
         expect=("--prompt-file {tags.txt} line 3 contains '<</SYS>>'", "--allow-chat-tags")),
    _gen("prompt-too-long", "--prompt", "hello " * 70,
         expect=("prompt 1", "exceed the model's context of 64", "--max-new-tokens")),
    _gen("prompt-file-missing", "--prompt-file", "{absent}",
         expect=("--prompt-file {absent}", "No such file")),
    _gen("prompt-file-directory", "--prompt-file", "{empty_dir}",
         expect=("--prompt-file {empty_dir}", "directory")),
    _gen("prompt-file-not-utf8", "--prompt-file", "{prompts.txt}",
         expect=("--prompt-file {prompts.txt}", "line 2 is not UTF-8")),
]
NUMBER_CASES = [
    *(_ev(f"{opt}={value}", opt, value, expect=(f"argument {opt}: {value}: must be >= {low}",))
      for opt, value, low in (("--batch-size", "0", 1), ("--micro-batch-size", "0", 1),
                              ("--max-batches", "-1", 0), ("--seq-len", "0", 1),
                              ("--tp", "0", 1), ("--pp", "-2", 1))),
    *(_gen(f"{opt}={value}", opt, value, expect=(f"argument {opt}: {message}",))
      for opt, value, message in (("--max-new-tokens", "0", "0: must be >= 1"),
                                  ("--top-k", "-1", "-1: must be >= 0"),
                                  ("--temperature", "-0.5", "-0.5: must be >= 0"),
                                  ("--temperature", "nan", "'nan': expected a finite number"),
                                  ("--top-p", "0", "0: must be in (0, 1]"),
                                  ("--top-p", "1.5", "1.5: must be in (0, 1]"),
                                  ("--tp", "-1", "-1: must be >= 1"),
                                  ("--pp", "0", "0: must be >= 1"))),
    _ev("batch-not-divisible", "--batch-size", "3", "--micro-batch-size", "2",
        expect=("--batch-size 3", "--micro-batch-size")),
]
LAYOUT_CASES = [
    _ev("tp-not-dividing-heads", "--tp", "3", expect=("--tp 3 does not divide n_heads=4",)),
    _gen("tp-not-dividing-heads", "--tp", "3", expect=("--tp 3 does not divide n_heads=4",)),
    _ev("pp-above-layers", "--pp", "3", expect=("--pp 3", "n_layers=2")),
    _gen("pp-above-layers", "--pp", "3", expect=("--pp 3", "n_layers=2")),
    _gen("tp-pp-not-world", "--tp", "2", expect=("--tp 2 * --pp 1 = 2", "world size 1")),
    _ev("device-cuda-without-gpu", "--device", "cuda", setup=_no_gpu,
        expect=("--device cuda", "no CUDA device")),
    _gen("device-cuda-without-gpu", "--device", "cuda", setup=_no_gpu,
         expect=("--device cuda", "no CUDA device")),
]
CASES = CHECKPOINT_CASES + DATA_CASES + PROMPT_CASES + NUMBER_CASES + LAYOUT_CASES


def _fill(text: str, inputs: dict[str, str]) -> str:
    return re.sub(r"\{([\w.]+)\}", lambda m: inputs[m.group(1)], text)


def _run(case: Case, inputs: dict[str, str], capsys) -> tuple[int, list[str]]:
    try:
        rc = PROGS[case.prog].main([_fill(a, inputs) for a in case.argv])
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, err.strip().splitlines()


@pytest.mark.parametrize("case", CASES, ids=[f"{c.prog}-{c.id}" for c in CASES])
def test_expected_failure_is_one_line(case: Case, inputs, capsys, monkeypatch) -> None:
    monkeypatch.delenv("MEGALLAMA_DEBUG", raising=False)
    if case.setup is not None:
        case.setup(monkeypatch)
    before = _snapshot(Path(inputs["root"]))
    rc, lines = _run(case, inputs, capsys)
    assert rc == 2, lines
    assert lines and lines[-1].startswith(f"megallama.{case.prog}: error: "), lines
    assert not any("Traceback" in line for line in lines), lines
    for expected in case.expect:
        assert _fill(expected, inputs) in lines[-1], lines[-1]
    if not case.expect[0].startswith("argument"):  # not argparse's usage + line
        assert len(lines) == 1, lines
    assert _snapshot(Path(inputs["root"])) == before, "a failed command changed its inputs"


def test_debug_adds_the_traceback(inputs, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MEGALLAMA_DEBUG", "1")
    rc, lines = _run(CHECKPOINT_CASES[3], inputs, capsys)  # truncated shard, evaluate
    assert rc == 2 and lines[0].startswith("Traceback") and "truncated" in lines[-1]
    assert lines[-1].startswith("megallama.evaluate: error: ")


# ---- under torchrun ------------------------------------------------------------------------------
TORCHRUN_CASES = [
    # found before torch.distributed starts: every rank finds the same
    ("evaluate", ["--checkpoint", "{step}", *EV, "--tp", "2", "--pp", "2"],
     "--tp 2 * --pp 2 = 4 does not divide the world size 2"),
    ("generate", ["--checkpoint", "{step}", *GEN, "--tp", "1"],
     "--tp 1 * --pp 1 = 1 does not equal the world size 2"),
    # found while loading, after torch.distributed started: the ranks agree on it
    ("generate", ["--checkpoint", "{truncated}", *GEN, "--pp", "2"], "truncated"),
]


@pytest.mark.slow
@pytest.mark.parametrize("prog,argv,expect", TORCHRUN_CASES,
                         ids=["evaluate-tp-pp-world", "generate-tp-pp-world",
                              "generate-shard-truncated-pp2"])
def test_every_rank_exits_with_the_same_line(prog, argv, expect, inputs, monkeypatch) -> None:
    monkeypatch.delenv("MEGALLAMA_DEBUG", raising=False)
    before = _snapshot(Path(inputs["root"]))
    # --tee 2 prefixes each rank's stderr with [<role><rank>]; a monitor interval longer than the
    # gap between the ranks' exits lets both end by themselves (torchrun SIGTERMs the others as
    # soon as it sees one failed worker)
    proc, seconds = torchrun(2, f"megallama.{prog}", [_fill(a, inputs) for a in argv],
                             timeout=180, launcher=("--tee", "2", "--monitor-interval", "8"))
    assert seconds < 120, f"took {seconds:.0f} s"
    ranks: dict[str, list[str]] = {}
    for match in re.finditer(r"^\[[a-z]+(\d+)\]:(.*)$", proc.stderr, re.MULTILINE):
        ranks.setdefault(match.group(1), []).append(match.group(2))
    assert sorted(ranks) == ["0", "1"], proc.stderr[-3000:]
    lines = {rank: out[-1] for rank, out in ranks.items()}
    assert lines["0"] == lines["1"], lines
    assert lines["0"].startswith(f"megallama.{prog}: error: ") and expect in lines["0"], lines
    assert not any("Traceback" in line for out in ranks.values() for line in out), ranks
    # torchrun's failure report: "rank : R (local_rank: R)" then "exitcode : C" per worker
    codes = dict(re.findall(r"rank\s*: (\d+) \(local_rank.*\n\s*exitcode\s*: (-?\d+)",
                            proc.stderr))
    assert codes == {"0": "2", "1": "2"}, proc.stderr[-3000:]
    assert _snapshot(Path(inputs["root"])) == before
