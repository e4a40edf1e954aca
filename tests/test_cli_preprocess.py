"""Bad input to ``megallama-preprocess`` and ``megallama-train-tokenizer``, one table row per case.

Every row runs the command line and checks what its user sees and what stays on disk: the exit
status (2 for a usage or input error, 1 for an OS error while writing), stderr's last line is
``<prog>: error: ...`` naming the file or option, no traceback, no output at all (no final or
temporary file, not even the missing parent directory of the prefix) and the inputs unchanged.
The rows run ``main`` in this process (fast); ``test_console_entry_points`` runs a few through
``python -m`` to pin the real process's exit status and stderr.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import lzma
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from megallama.data import outputs as outputs_module
from megallama.data import preprocess as preprocess_module
from megallama.data import tokenizer_trainer
from megallama.data.tokenizer_trainer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
PREPROCESS, TRAIN_TOKENIZER = "megallama-preprocess", "megallama-train-tokenizer"
MAINS: dict[str, Callable[[list[str]], int]] = {
    PREPROCESS: preprocess_module.main, TRAIN_TOKENIZER: tokenizer_trainer.main,
}
WORDS = "the of and to in a is that for it as was with be by on not he this are or his".split()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One file (or directory) per kind of bad input, next to good ones."""
    root = tmp_path_factory.mktemp("inputs")
    good = "\n\n".join(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) + "."
                       for i in range(300))
    (root / "good.txt").write_text(good + "\n", encoding="utf-8")
    (root / "good.jsonl").write_text(json.dumps({"text": "one doc"}) + "\n", encoding="utf-8")
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.txt").write_text("\n \n\t\n", encoding="utf-8")
    (root / "adir").mkdir()
    (root / "taken.bin").mkdir()  # an output path that is a directory
    (root / "latin1.txt").write_bytes(b"fine line\n\nsecond doc caf\xe9\n")
    (root / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    (root / "allbad.jsonl").write_text("{oops\nnot json\n", encoding="utf-8")
    (root / "nokey.jsonl").write_text('{"body": "no text field"}\n', encoding="utf-8")
    (root / "nonstr.jsonl").write_text('{"text": 5}\n', encoding="utf-8")
    (root / "array.jsonl").write_text('["a", "list"]\n', encoding="utf-8")
    for name, line in JSON_PYTHON_CANNOT_READ.items():  # a good record first: the bad one is line 2
        first = {"prompt": "a b", "response": "b a"} if "chat" in name else {"text": "ok"}
        (root / name).write_text(json.dumps(first) + "\n" + line + "\n", encoding="utf-8")
    for name, records in CHAT_FILES.items():  # a good dialog first: the bad one is on line 2
        lines = [{"prompt": "a b c", "response": "c b a"}, *records]
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    packed = gzip.compress(good.encode())
    (root / "trunc.txt.gz").write_bytes(packed[: len(packed) // 2])
    (root / "plain.txt.gz").write_text("not gzip at all\n", encoding="utf-8")
    packed = lzma.compress(good.encode())
    (root / "trunc.txt.xz").write_bytes(packed[: len(packed) // 2])
    train_tokenizer([root / "good.txt"], root / "tok", vocab_size=300, num_threads=1)
    (root / "fake.model").write_bytes(b"this is not a protobuf \xff\xfe" * 10)
    (root / "empty.model").write_bytes(b"")
    return root


def _m(role: str, content: object) -> dict[str, object]:
    return {"role": role, "content": content}


CHAT_FILES = {  # chat JSONL inputs whose second record is bad
    "alternate.jsonl": [{"messages": [_m("user", "a"), _m("user", "b"), _m("assistant", "c")]}],
    "ends-user.jsonl": [{"messages": [_m("user", "a"), _m("assistant", "b"), _m("user", "c")]}],
    "empty-answer.jsonl": [{"messages": [_m("user", "a"), _m("assistant", "  ")]}],
    "role.jsonl": [{"messages": [_m("user", "a"), _m("bot", "b")]}],
    "content.jsonl": [{"messages": [_m("user", ["a"]), _m("assistant", "b")]}],
    "both.jsonl": [{"messages": [_m("user", "a"), _m("assistant", "b")], "prompt": "a"}],
    "no-response.jsonl": [{"prompt": "a"}],
    "mixed.jsonl": [{"text": "a text record"}],
    "good-chat.jsonl": [],
}

JSON_PYTHON_CANNOT_READ = {  # second lines that are (nearly) JSON but not a document
    "surrogate.jsonl": '{"text": "a\\ud800b"}',  # lone surrogate escapes: no character
    "surrogate-upper.jsonl": '{"text": "\\uDFFF", "id": 1}',
    "surrogate-chat.jsonl": '{"prompt": "a \\udfff", "response": "b"}',
    "deep.jsonl": '{"text": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "long-int.jsonl": '{"text": "a", "id": ' + "7" * 5001 + "}",
    "cut.jsonl": '{"text": "abc", "meta": {"a": 1',  # a record cut short
    "cut-string.jsonl": '{"text": "abc',
}

# (id, program, argv, fragment of the last line after "<prog>: error: ", exit status);
# {in} is the inputs directory, {out} an output prefix whose parent directory does not exist
P, T = PREPROCESS, TRAIN_TOKENIZER
TOK = ("--tokenizer", "{in}/tok.model")
ROWS: list[tuple[str, str, tuple[str, ...], str, int]] = [
    # inputs: missing, empty, not a file, not readable, not UTF-8
    ("missing-input", P, ("{in}/missing.txt", *TOK), "input file not found: {in}/missing.txt", 2),
    ("empty-input", P, ("{in}/empty.txt", *TOK), "input file {in}/empty.txt contains no "
                                                  "documents: it is empty", 2),
    ("blank-input", P, ("{in}/blank.txt", *TOK), "{in}/blank.txt contains no documents", 2),
    ("second-input-empty", P, ("{in}/good.txt", "{in}/empty.txt", *TOK),
     "input file {in}/empty.txt contains no documents", 2),
    ("directory-input", P, ("{in}/adir", *TOK), "input {in}/adir is a directory, not a file", 2),
    ("unreadable-input", P, ("/proc/self/mem", *TOK),
     "cannot read input file /proc/self/mem: Input/output error", 2),
    ("not-utf8", P, ("{in}/latin1.txt", *TOK), "{in}/latin1.txt:3: not valid UTF-8 (invalid "
                                               "continuation byte at byte 14 of the line", 2),
    # JSONL: malformed (fail, and skip with nothing left), no key, not a string, not an object
    ("bad-json", P, ("{in}/bad.jsonl", *TOK), "{in}/bad.jsonl:2: invalid JSON (", 2),
    ("bad-json-skipped-all", P, ("{in}/allbad.jsonl", *TOK, "--skip-bad-json"),
     "{in}/allbad.jsonl contains no documents: all 2 non-blank lines were malformed JSON", 2),
    ("jsonl-no-key", P, ("{in}/nokey.jsonl", *TOK), "{in}/nokey.jsonl:1: no string field 'text' "
                                                    "in this JSON line (its keys: body)", 2),
    ("jsonl-other-key", P, ("{in}/good.jsonl", *TOK, "--jsonl-key", "body"),
     "{in}/good.jsonl:1: no string field 'body'", 2),
    ("jsonl-non-string", P, ("{in}/nonstr.jsonl", *TOK),
     "{in}/nonstr.jsonl:1: no string field 'text': its value is a JSON number", 2),
    ("jsonl-not-object", P, ("{in}/array.jsonl", *TOK), "{in}/array.jsonl:1: no string field "
                                                        "'text': the line is a JSON array", 2),
    # JSON Python cannot read (or that is no text): a bad line like malformed JSON, skippable
    ("json-lone-surrogate", P, ("{in}/surrogate.jsonl", *TOK), "{in}/surrogate.jsonl:2: invalid "
     "JSON string: 'text' holds the lone surrogate escape \\ud800 at column 12", 2),
    ("json-lone-surrogate-upper", P, ("{in}/surrogate-upper.jsonl", *TOK),
     "{in}/surrogate-upper.jsonl:2: invalid JSON string: 'text' holds the lone surrogate escape "
     "\\udfff at column 11", 2),
    ("chat-lone-surrogate", P, ("{in}/surrogate-chat.jsonl", *TOK), "{in}/surrogate-chat.jsonl:2: "
     "invalid JSON string: message 1 (user): 'content' holds the lone surrogate escape \\udfff", 2),
    ("json-nested-too-deep", P, ("{in}/deep.jsonl", *TOK), "{in}/deep.jsonl:2: invalid JSON "
     "(nested more than about", 2),
    ("json-long-integer", P, ("{in}/long-int.jsonl", *TOK), "{in}/long-int.jsonl:2: invalid JSON "
     "(an integer of 5,001 digits at column 21: Python's JSON parser reads at most 4,300)", 2),
    ("json-cut-short", P, ("{in}/cut.jsonl", *TOK), "{in}/cut.jsonl:2: invalid JSON (Expecting "
     "',' delimiter at column 32; the line ends inside the record", 2),
    ("json-cut-in-a-string", P, ("{in}/cut-string.jsonl", *TOK), "{in}/cut-string.jsonl:2: "
     "invalid JSON (Unterminated string starting at column 10; the line ends inside", 2),
    # chat JSONL: dialogs that break the format, records that mix the forms or the kinds
    ("chat-not-alternating", P, ("{in}/alternate.jsonl", *TOK), "{in}/alternate.jsonl:2: bad "
     "dialog: message 2: expected 'assistant' after a 'user' turn, got 'user'", 2),
    ("chat-ends-with-user", P, ("{in}/ends-user.jsonl", *TOK), "{in}/ends-user.jsonl:2: bad "
     "dialog: the dialog ends with a 'user' turn (message 3); a training dialog must end with "
     "an 'assistant' turn", 2),
    ("chat-empty-answer", P, ("{in}/empty-answer.jsonl", *TOK), "{in}/empty-answer.jsonl:2: bad "
     "dialog: message 2: empty assistant turn", 2),
    ("chat-unknown-role", P, ("{in}/role.jsonl", *TOK), "{in}/role.jsonl:2: bad dialog: "
     "message 2: unknown role 'bot'", 2),
    ("chat-content-not-string", P, ("{in}/content.jsonl", *TOK), "{in}/content.jsonl:2: bad "
     "dialog: message 1 (user): 'content' must be a string, got a JSON array", 2),
    ("chat-messages-and-prompt", P, ("{in}/both.jsonl", *TOK), "{in}/both.jsonl:2: bad dialog: "
     "the record has both 'messages' and 'prompt'", 2),
    ("chat-prompt-without-response", P, ("{in}/no-response.jsonl", *TOK),
     "{in}/no-response.jsonl:2: bad dialog: 'prompt' without 'response'", 2),
    ("chat-and-text-records", P, ("{in}/mixed.jsonl", *TOK), "{in}/mixed.jsonl:2: not a dialog: "
     "no 'messages' or 'prompt'/'response' field (its keys: text), but the file's first record "
     "(line 1) is a dialog", 2),
    ("chat-all-overlong", P, ("{in}/good-chat.jsonl", *TOK, "--max-tokens", "3"),
     "the one document is longer than --max-tokens 3: nothing to write", 2),
    ("max-tokens-0", P, ("{in}/good-chat.jsonl", *TOK, "--max-tokens", "0"),
     "argument --max-tokens: 0: must be >= 1", 2),
    ("overlong-without-max-tokens", P, ("{in}/good-chat.jsonl", *TOK, "--overlong", "drop"),
     "--overlong needs --max-tokens N", 2),
    ("overlong-unknown", P, ("{in}/good-chat.jsonl", *TOK, "--max-tokens", "9", "--overlong",
                             "cut"), "argument --overlong: invalid choice: 'cut'", 2),
    # compressed inputs: truncated, not compressed at all
    ("gz-truncated", P, ("{in}/trunc.txt.gz", *TOK),
     "{in}/trunc.txt.gz: compressed file is truncated or damaged", 2),
    ("xz-truncated", P, ("{in}/trunc.txt.xz", *TOK),
     "{in}/trunc.txt.xz: compressed file is truncated or damaged", 2),
    ("gz-not-gzip", P, ("{in}/plain.txt.gz", *TOK),
     "{in}/plain.txt.gz: compressed file is truncated or damaged", 2),
    # the tokenizer: missing, a directory, empty, not a SentencePiece model
    ("missing-tokenizer", P, ("{in}/good.txt", "--tokenizer", "{in}/none.model"),
     "tokenizer model not found: {in}/none.model", 2),
    ("tokenizer-directory", P, ("{in}/good.txt", "--tokenizer", "{in}/adir"),
     "tokenizer model is not a file: {in}/adir", 2),
    ("tokenizer-empty", P, ("{in}/good.txt", "--tokenizer", "{in}/empty.model"),
     "tokenizer model {in}/empty.model is empty", 2),
    ("tokenizer-not-spm", P, ("{in}/good.txt", "--tokenizer", "{in}/fake.model"),
     "tokenizer model {in}/fake.model is not a valid SentencePiece model", 2),
    # options: counts, required options
    ("workers-0", P, ("{in}/good.txt", *TOK, "--workers", "0"), "argument --workers: 0: must "
                                                                "be >= 1", 2),
    ("workers-negative", P, ("{in}/good.txt", *TOK, "--workers", "-1"),
     "argument --workers: -1: must be >= 1", 2),
    ("workers-not-int", P, ("{in}/good.txt", *TOK, "--workers", "x"),
     "argument --workers: 'x': expected an integer", 2),
    ("no-tokenizer-option", P, ("{in}/good.txt",), "the following arguments are required: "
                                                   "--tokenizer", 2),
    # the output prefix: under a file, a directory name, a target that is a directory
    ("prefix-under-file", P, ("{in}/good.txt", *TOK, "--output-prefix", "{in}/good.txt/sub/p"),
     "--output-prefix {in}/good.txt/sub/p: {in}/good.txt is not a directory", 2),
    ("prefix-is-directory", P, ("{in}/good.txt", *TOK, "--output-prefix", "{in}/adir/"),
     "--output-prefix '{in}/adir/' names a directory, not a file prefix", 2),
    ("prefix-target-directory", P, ("{in}/good.txt", *TOK, "--output-prefix", "{in}/taken"),
     "--output-prefix {in}/taken: {in}/taken.bin is a directory", 2),
    # megallama-train-tokenizer: the same inputs, then its own options
    ("tok-missing-input", T, ("{in}/missing.txt",), "input file not found: {in}/missing.txt", 2),
    ("tok-empty-input", T, ("{in}/empty.txt",), "{in}/empty.txt contains no documents", 2),
    ("tok-directory-input", T, ("{in}/adir",), "input {in}/adir is a directory", 2),
    ("tok-unreadable-input", T, ("/proc/self/mem",), "cannot read input file /proc/self/mem", 2),
    ("tok-not-utf8", T, ("{in}/latin1.txt",), "{in}/latin1.txt:3: not valid UTF-8", 2),
    ("tok-bad-json", T, ("{in}/bad.jsonl",), "{in}/bad.jsonl:2: invalid JSON", 2),
    ("tok-bad-json-skipped-all", T, ("{in}/allbad.jsonl", "--skip-bad-json"),
     "{in}/allbad.jsonl contains no documents", 2),
    ("tok-jsonl-non-string", T, ("{in}/nonstr.jsonl",), "no string field 'text'", 2),
    ("tok-lone-surrogate", T, ("{in}/surrogate.jsonl",), "{in}/surrogate.jsonl:2: invalid JSON "
     "string: 'text' holds the lone surrogate escape", 2),
    ("tok-nested-too-deep", T, ("{in}/deep.jsonl",), "{in}/deep.jsonl:2: invalid JSON", 2),
    ("tok-long-integer", T, ("{in}/long-int.jsonl",), "{in}/long-int.jsonl:2: invalid JSON", 2),
    ("tok-chat-jsonl", T, ("{in}/good-chat.jsonl",), "{in}/good-chat.jsonl:1: a dialog ('messages' "
     "or 'prompt'/'response' record), not a text record: its text is spread over its messages, so "
     "no --jsonl-key names it, and only megallama-preprocess reads dialogs; train the tokenizer on "
     "a text corpus", 2),
    ("tok-gz-truncated", T, ("{in}/trunc.txt.gz",), "compressed file is truncated or damaged", 2),
    ("vocab-too-small", T, ("{in}/good.txt", "--vocab-size", "100"),
     "argument --vocab-size: 100: must be >= 260", 2),
    ("vocab-too-large", T, ("{in}/good.txt", "--vocab-size", "100000"),
     "--vocab-size 100000 is too large for the corpus {in}/good.txt: it yields at most", 2),
    ("vocab-not-int", T, ("{in}/good.txt", "--vocab-size", "8k"),
     "argument --vocab-size: '8k': expected an integer", 2),
    ("max-sentences-0", T, ("{in}/good.txt", "--max-sentences", "0"),
     "argument --max-sentences: 0: must be >= 1", 2),
    ("num-threads-negative", T, ("{in}/good.txt", "--num-threads", "-1"),
     "argument --num-threads: -1: must be >= 1", 2),
    ("coverage-out-of-range", T, ("{in}/good.txt", "--character-coverage", "0.5"),
     "argument --character-coverage: 0.5: must be in [0.98, 1.0]", 2),
    ("seed-negative", T, ("{in}/good.txt", "--seed", "-1"), "argument --seed: -1: must be in", 2),
    ("tok-prefix-under-file", T, ("{in}/good.txt", "--output-prefix", "{in}/good.txt/t"),
     "--output-prefix {in}/good.txt/t: {in}/good.txt is not a directory", 2),
    ("tok-prefix-is-directory", T, ("{in}/good.txt", "--output-prefix", "{in}/adir/"),
     "names a directory, not a file prefix", 2),
]


def tree_state(root: Path) -> dict[str, str]:
    """Every path under ``root`` (directories too) with the SHA-256 of the files."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        state[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return state


def run_main(prog: str, argv: list[str]) -> int:
    """The exit status of ``main(argv)`` of ``prog``, run in this process. An exception other
    than argparse's SystemExit propagates and fails the test, as a traceback would."""
    try:
        return MAINS[prog](argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


def check_failure(err: str, prog: str, message: str) -> None:
    """The shape every expected failure has on stderr: the last line names the problem."""
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert last.startswith(f"{prog}: error: "), err
    assert message in last, f"expected {message!r} in {last!r}"


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_and_leaves_nothing(row, inputs: Path, tmp_path: Path, capsys,
                                                  monkeypatch) -> None:
    name, prog, argv, message, code = row
    if "/proc/self/mem" in argv and not Path("/proc/self/mem").is_file():
        pytest.skip("needs Linux /proc (an input the OS refuses to read, even for root)")
    monkeypatch.delenv("MEGALLAMA_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    fill = {"in": str(inputs)}
    args = [a.format(**fill) for a in argv]
    if "--output-prefix" not in args:
        args += ["--output-prefix", str(tmp_path / "new" / "out")]  # parent does not exist
    if prog == TRAIN_TOKENIZER and "--vocab-size" not in args:
        args += ["--vocab-size", "300", "--num-threads", "1"]
    before_inputs, before_here = tree_state(inputs), tree_state(tmp_path)
    status = run_main(prog, args)
    err = capsys.readouterr().err
    assert status == code, f"{name}: exit {status}\n{err}"
    check_failure(err, prog, message.format(**fill))
    assert tree_state(tmp_path) == before_here  # no output, temporary file or directory
    assert tree_state(inputs) == before_inputs


def test_console_entry_points(inputs: Path, tmp_path: Path) -> None:
    """The real processes: exit status 2, one line, no traceback; MEGALLAMA_DEBUG=1 adds it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MEGALLAMA_DEBUG", None)
    out = str(tmp_path / "new" / "p")
    for module, prog, argv, message in (
        ("megallama.data.preprocess", PREPROCESS,
         [f"{inputs}/bad.jsonl", "--tokenizer", f"{inputs}/tok.model", "--output-prefix", out],
         f"{inputs}/bad.jsonl:2: invalid JSON"),
        ("megallama.data.tokenizer_trainer", TRAIN_TOKENIZER,
         [f"{inputs}/missing.txt", "--output-prefix", out], "input file not found"),
    ):
        cmd = [sys.executable, "-m", module, *argv]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        check_failure(proc.stderr, prog, message)
        debug = subprocess.run(cmd, cwd=REPO, env={**env, "MEGALLAMA_DEBUG": "1"},
                               capture_output=True, text=True, timeout=120)
        assert debug.returncode == 2 and "Traceback" in debug.stderr
        assert debug.stderr.strip().splitlines()[-1].startswith(f"{prog}: error: {message}")
    assert not (tmp_path / "new").exists()


def _good_run(inputs: Path, prefix: Path) -> dict[str, str]:
    assert preprocess_module.main([str(inputs / "good.txt"), "--tokenizer",
                                   str(inputs / "tok.model"), "--output-prefix", str(prefix),
                                   "--quiet"]) == 0
    return tree_state(prefix.parent)


def test_failed_rerun_keeps_the_previous_output(inputs: Path, tmp_path: Path, capsys,
                                                monkeypatch) -> None:
    """Input errors, and an OS error in the middle of publishing the new files (the summary's
    rename fails after the new .bin is in place): the earlier .bin/.idx/.summary.json stay."""
    prefix = tmp_path / "out" / "p"
    before = _good_run(inputs, prefix)
    capsys.readouterr()
    for bad in ("bad.jsonl", "latin1.txt", "trunc.txt.gz"):
        argv = [str(inputs / bad), "--tokenizer", str(inputs / "tok.model"),
                "--output-prefix", str(prefix)]
        assert preprocess_module.main(argv) == 2
        check_failure(capsys.readouterr().err, PREPROCESS, str(inputs / bad))
        assert tree_state(prefix.parent) == before

    real_replace = os.replace

    def failing_replace(src, dst):
        if ".summary.json.tmp" in str(src):
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(outputs_module.os, "replace", failing_replace)
    argv = [str(inputs / "good.jsonl"), "--tokenizer", str(inputs / "tok.model"),
            "--output-prefix", str(prefix), "--quiet"]
    assert preprocess_module.main(argv) == 1
    check_failure(capsys.readouterr().err, PREPROCESS,
                  f"{prefix}.summary.json: Input/output error (writing --output-prefix {prefix}")
    assert tree_state(prefix.parent) == before


def test_os_error_while_writing_is_exit_1_and_leaves_nothing(inputs: Path, tmp_path: Path,
                                                             capsys, monkeypatch) -> None:
    """A full disk while tokenizing (preprocess) or writing the model (train-tokenizer)."""
    def full_disk(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "new"))

    monkeypatch.setattr(preprocess_module.IndexedWriter, "add_documents", full_disk)
    prefix = tmp_path / "new" / "deeper" / "p"
    assert preprocess_module.main([str(inputs / "good.txt"), "--tokenizer",
                                   str(inputs / "tok.model"), "--output-prefix", str(prefix),
                                   "--quiet"]) == 1
    check_failure(capsys.readouterr().err, PREPROCESS, "No space left on device")
    monkeypatch.setattr(Path, "write_bytes", full_disk)
    assert tokenizer_trainer.main([str(inputs / "good.txt"), "--output-prefix", str(prefix),
                                   "--vocab-size", "300", "--num-threads", "1"]) == 1
    check_failure(capsys.readouterr().err, TRAIN_TOKENIZER, "No space left on device")
    assert list(tmp_path.iterdir()) == []  # not even the directories it created


@pytest.mark.parametrize("name", sorted(JSON_PYTHON_CANNOT_READ))
def test_json_python_cannot_read_is_skipped_and_counted(name: str, inputs: Path, tmp_path: Path,
                                                        capsys) -> None:
    """With --skip-bad-json such a line is skipped like malformed JSON: reported on stderr and
    counted in the summary, the file's good record written."""
    prefix = tmp_path / "p"
    argv = [str(inputs / name), "--tokenizer", str(inputs / "tok.model"),
            "--output-prefix", str(prefix), "--quiet", "--skip-bad-json"]
    assert preprocess_module.main(argv) == 0
    summary = json.loads(Path(f"{prefix}.summary.json").read_text())
    assert (summary["documents"], summary["skipped_bad_json_lines"]) == (1, 1)
    assert f"skipped malformed JSON: {inputs / name}:2: invalid JSON" in capsys.readouterr().err
