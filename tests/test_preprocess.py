"""Preprocessing: text/JSONL (plain or compressed) -> indexed token file, token for token."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import sys
from pathlib import Path

import numpy as np
import pytest

from megallama.config import ConfigError, preset
from megallama.config.train_config import DataConfig
from megallama.data import preprocess as preprocess_module
from megallama.data.chat import encode_dialog, record_messages
from megallama.data.checks import check_data_files
from megallama.data.indexed import IndexedFormatError, IndexedTokens
from megallama.data.preprocess import main, preprocess
from megallama.data.sources import SourceError
from megallama.data.tokenizer import Tokenizer, TokenizerError
from megallama.data.tokenizer_trainer import train_tokenizer
from tests.conftest import require_llama_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
SOTU_TRAIN = REPO / "data" / "sotu" / "train.txt.gz"

DOCS = [
    "The first document, on one line.",
    "A document\nspanning three\nlines with a trailing space ",
    "  Leading spaces, a\ttab, emoji 😀 and CJK 中文.",
    "Numbers 1790 and 2021; symbols <>&\"'",
    "x",
]


def _write_text(path: Path, docs: list[str]) -> Path:
    # vary the separators: one blank line, several, a whitespace-only line
    separators = ["\n\n", "\n\n\n", "\n \t\n"]
    parts = [docs[0]]
    for i, doc in enumerate(docs[1:]):
        parts.append(separators[i % len(separators)] + doc)
    path.write_text("".join(parts) + "\n", encoding="utf-8")
    return path


def _write_jsonl(path: Path, docs: list[str], opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, "text": doc}) + "\n")
            if i == 1:
                f.write("\n")  # blank lines are ignored
    return path


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("tok")
    with gzip.open(SOTU_TRAIN, "rt", encoding="utf-8") as f:
        text = f.read(100_000)
    source = tmp / "slice.txt"
    source.write_text(text[: text.rfind(" ")] + "\n", encoding="utf-8")
    return train_tokenizer([source], tmp / "small", vocab_size=500)


@pytest.fixture(params=["trained", "llama"])
def model(request: pytest.FixtureRequest, small_model: Path) -> Path:
    if request.param == "llama":
        return require_llama_tokenizer()
    return small_model


def _expected(model: Path, docs: list[str], bos: bool = True, eos: bool = True) -> list[list[int]]:
    tok = Tokenizer(model)
    return [tok.encode(d, bos=bos, eos=eos) for d in docs]


def _documents(prefix: Path) -> list[list[int]]:
    indexed = IndexedTokens(prefix)
    return [indexed.document(i).tolist() for i in range(indexed.num_docs)]


def _outputs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("workers", [1, 2])
def test_text_matches_direct_tokenization(model: Path, tmp_path: Path, workers: int) -> None:
    source = _write_text(tmp_path / "corpus.txt", DOCS)
    summary = preprocess([source], tmp_path / "out" / "c", model, workers=workers, progress=False)
    expected = _expected(model, DOCS)
    assert _documents(tmp_path / "out" / "c") == expected
    assert summary["documents"] == len(DOCS)
    assert summary["tokens"] == sum(map(len, expected))
    assert summary["bytes"] == sum(len(d.encode("utf-8")) for d in DOCS)
    assert summary["workers"] == workers
    assert _outputs(tmp_path / "out") == ["c.bin", "c.idx", "c.summary.json"]


def test_jsonl_matches_direct_tokenization(model: Path, tmp_path: Path) -> None:
    paths = [_write_jsonl(tmp_path / "a.jsonl", DOCS), _write_jsonl(tmp_path / "b.json", DOCS[:2])]
    preprocess(paths, tmp_path / "j", model, progress=False)
    assert _documents(tmp_path / "j") == _expected(model, DOCS + DOCS[:2])


def test_compressed_inputs_give_identical_tokens(small_model: Path, tmp_path: Path) -> None:
    plain = _write_text(tmp_path / "c.txt", DOCS)
    preprocess([plain], tmp_path / "plain", small_model, progress=False)
    gz = tmp_path / "c.txt.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    xz = tmp_path / "c.txt.xz"
    xz.write_bytes(lzma.compress(plain.read_bytes()))
    jsonl_gz = _write_jsonl(tmp_path / "c.jsonl.gz", DOCS, opener=gzip.open)
    reference = (tmp_path / "plain.bin").read_bytes()
    for path in (gz, xz, jsonl_gz):
        preprocess([path], tmp_path / path.name, small_model, progress=False)
        assert (tmp_path / f"{path.name}.bin").read_bytes() == reference, path.name


def test_many_chunks_with_two_workers_keep_order(
    small_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preprocess_module, "CHUNK_DOCS", 3)  # chunking runs in this process
    docs = [f"Document number {i}: " + "word " * (i % 17) for i in range(200)]
    sources = [
        _write_text(tmp_path / "p1.txt", docs[:120]),
        _write_jsonl(tmp_path / "p2.jsonl", docs[120:]),
    ]
    summary = preprocess(sources, tmp_path / "m", small_model, workers=2, progress=False)
    assert _documents(tmp_path / "m") == _expected(small_model, docs)
    offsets = IndexedTokens(tmp_path / "m").doc_offsets
    assert offsets[-1] == summary["tokens"] and len(offsets) == 201


def test_bos_eos_options(small_model: Path, tmp_path: Path) -> None:
    source = _write_text(tmp_path / "c.txt", DOCS)
    preprocess([source], tmp_path / "n", small_model, append_eos=False, progress=False)
    assert _documents(tmp_path / "n") == _expected(small_model, DOCS, eos=False)
    preprocess([source], tmp_path / "m", small_model, prepend_bos=False, progress=False)
    assert _documents(tmp_path / "m") == _expected(small_model, DOCS, bos=False)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_cli_prints_and_writes_summary_with_progress(
    small_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = _write_text(tmp_path / "c.txt", DOCS)
    prefix = tmp_path / "cli"
    argv = [str(source), "--tokenizer", str(small_model), "--output-prefix", str(prefix)]
    terminal = _Tty()
    monkeypatch.setattr(sys, "stderr", terminal)  # the bar is drawn on a terminal only
    assert main(argv) == 0
    out = capsys.readouterr()
    printed = json.loads(out.out)
    written = json.loads(Path(f"{prefix}.summary.json").read_text())
    assert printed == written
    for key in ("documents", "tokens", "bytes", "seconds", "tokens_per_s"):
        assert key in written
    assert written["documents"] == len(DOCS) and written["tokens_per_s"] > 0
    assert written["dtype"] == "uint16" and written["vocab_size"] == 500
    final = terminal.getvalue().rstrip("\n").split("\r")[-1]
    assert final.startswith("[preprocess]: 100%") and "ETA" in final and "B/s" in final
    assert f"{len(DOCS)} docs, {written['tokens']} tokens" in final and "tok/s" in final


def test_progress_only_on_a_terminal_and_not_when_quiet(
    small_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = _write_text(tmp_path / "c.txt", DOCS)
    argv = [str(source), "--tokenizer", str(small_model)]
    assert main([*argv, "--output-prefix", str(tmp_path / "pipe")]) == 0
    assert capsys.readouterr().err == ""  # stderr is not a terminal here: no bar
    terminal = _Tty()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main([*argv, "--output-prefix", str(tmp_path / "quiet"), "--quiet"]) == 0
    assert terminal.getvalue() == ""


def test_skipped_lines_print_above_the_bar(
    small_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text": "one"}\nnot json\n{"text": "two"}\n', encoding="utf-8")
    terminal = _Tty()
    monkeypatch.setattr(sys, "stderr", terminal)
    preprocess([source], tmp_path / "s", small_model, on_bad_json="skip")
    before, after = terminal.getvalue().split(f"[preprocess] skipped malformed JSON: {source}:2:")
    assert before.endswith("\r")  # the bar line was cleared first, the message starts clean
    assert "\n" in after and "100%" in after.split("\n", 1)[1]  # the bar goes on below it


def test_bad_json_fails_with_file_and_line(small_model: Path, tmp_path: Path) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text": "ok"}\n\n{"text": "broken\n{"text": "fine"}\n', encoding="utf-8")
    with pytest.raises(SourceError, match=rf"{source}:3: invalid JSON"):
        preprocess([source], tmp_path / "out" / "b", small_model, progress=False)
    assert not (tmp_path / "out").exists() or _outputs(tmp_path / "out") == []
    missing_key = tmp_path / "key.jsonl"
    missing_key.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(SourceError, match=rf"{missing_key}:2: no string field 'text'"):
        preprocess([missing_key], tmp_path / "k", small_model, progress=False)


def test_bad_json_skip_counts_and_reports(
    small_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "bad.jsonl"
    lines = ['{"text": "one"}', "not json", '{"text": "two"}', '["a list"]', '{"text": ""}']
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = preprocess([source], tmp_path / "s", small_model, on_bad_json="skip")
    assert summary["skipped_bad_json_lines"] == 2
    assert summary["skipped_empty_documents"] == 1
    assert _documents(tmp_path / "s") == _expected(small_model, ["one", "two"])
    err = capsys.readouterr().err
    assert f"{source}:2:" in err and f"{source}:4:" in err


@pytest.mark.parametrize("content", ["", "\n\n  \n\t\n"])
def test_empty_input_is_a_clear_error_and_writes_nothing(
    small_model: Path, tmp_path: Path, content: str
) -> None:
    good = _write_text(tmp_path / "good.txt", DOCS)
    empty = tmp_path / "empty.txt"
    empty.write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(SourceError, match=rf"{empty} contains no documents"):
        preprocess([good, empty], out / "e", small_model, workers=2, progress=False)
    assert not out.exists() or _outputs(out) == []  # no final and no temporary files


def test_failed_run_keeps_previous_outputs(small_model: Path, tmp_path: Path) -> None:
    good = _write_text(tmp_path / "good.txt", DOCS)
    prefix = tmp_path / "out" / "p"
    preprocess([good], prefix, small_model, progress=False)
    before = {name: (tmp_path / "out" / name).read_bytes() for name in _outputs(tmp_path / "out")}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(SourceError, match=":2:"):
        preprocess([good, bad], prefix, small_model, progress=False)
    after = {name: (tmp_path / "out" / name).read_bytes() for name in _outputs(tmp_path / "out")}
    assert after == before


def test_missing_inputs_and_tokenizer(
    small_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _write_text(tmp_path / "good.txt", DOCS)
    missing_model = tmp_path / "none" / "tokenizer.model"
    with pytest.raises(TokenizerError, match=f"tokenizer model not found: {missing_model}"):
        preprocess([good], tmp_path / "x", missing_model, progress=False)
    with pytest.raises(SourceError, match="input file not found"):
        preprocess([tmp_path / "nope.txt"], tmp_path / "x", small_model, progress=False)
    argv = [str(good), "--tokenizer", str(missing_model), "--output-prefix", str(tmp_path / "x")]
    assert main(argv) == 2  # an input error, like a usage error
    assert f"error: tokenizer model not found: {missing_model}" in capsys.readouterr().err
    assert not list(tmp_path.glob("x*"))


def test_invalid_utf8_names_file_and_line(small_model: Path, tmp_path: Path) -> None:
    source = tmp_path / "latin1.txt"
    source.write_bytes(b"fine line\n\nsecond doc caf\xe9\n")
    with pytest.raises(SourceError) as info:
        preprocess([source], tmp_path / "u", small_model, progress=False)
    assert str(info.value) == (f"{source}:3: not valid UTF-8 (invalid continuation byte at byte "
                               "14 of the line, offset 25)")
    # far past the text stream's first decoded block, and compressed: still the right line
    big = tmp_path / "big.txt.gz"
    with gzip.open(big, "wb") as f:
        f.write(b"plain ascii line\n" * 999 + b"bad \xff here\n")
    with pytest.raises(SourceError, match=rf"^{big}:1000: not valid UTF-8 \(invalid start byte "
                                          rf"at byte 4 of the line, offset {17 * 999 + 4}\)$"):
        preprocess([big], tmp_path / "v", small_model, progress=False)


def test_demo_corpus_preprocesses(small_model: Path, tmp_path: Path) -> None:
    val = REPO / "data" / "sotu" / "val.txt.gz"
    summary = preprocess([val], tmp_path / "val", small_model, workers=2, progress=False)
    indexed = IndexedTokens(tmp_path / "val")
    assert summary["documents"] == indexed.num_docs == 23
    assert summary["bytes"] == 1_052_028 - 2 * 22 - 1  # minus blank-line separators, final \n
    starts = indexed.tokens[indexed.doc_offsets[:-1]]
    ends = indexed.tokens[indexed.doc_offsets[1:] - 1]
    assert np.all(starts == 1) and np.all(ends == 2)


@pytest.mark.parametrize("value,message", [("0", "argument --workers: 0: must be >= 1"),
                                           ("-2", "argument --workers: -2: must be >= 1"),
                                           ("many", "argument --workers: 'many': expected")])
def test_cli_refuses_workers_below_one(small_model: Path, tmp_path: Path, capsys, value,
                                       message) -> None:
    source = tmp_path / "doc.txt"
    source.write_text("one document\n")
    with pytest.raises(SystemExit) as info:
        main([str(source), "--tokenizer", str(small_model), "--output-prefix",
              str(tmp_path / "out"), "--workers", value])
    assert info.value.code == 2 and not list(tmp_path.glob("out*"))
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


# --- chat data: dialogs -> tokens + loss mask ------------------------------------------------

def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


CHAT_RECORDS = [
    {"messages": [_msg("system", "You are terse."), _msg("user", " Name three colours.\n"),
                  _msg("assistant", "Red, green, blue.")]},
    {"prompt": "  What is 2 + 2?", "response": "\n4\n"},
    {"messages": [_msg("user", "Hi"), _msg("assistant", "Hello."), _msg("user", "Bye"),
                  _msg("assistant", "Goodbye! 😀")]},
    {"system": "Answer in French.", "prompt": "Thanks", "response": "Merci, de rien."},
]


def _write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _dialogs(model: Path, records: list[dict]) -> list[tuple[list[int], list[bool]]]:
    tok = Tokenizer(model)
    return [encode_dialog(tok, record_messages(r)) for r in records]


def _masks(prefix: Path) -> list[list[int]]:
    indexed = IndexedTokens(prefix)
    assert indexed.loss_mask is not None and indexed.loss_mask.dtype == np.uint8
    return [indexed.loss_mask[a:b].tolist()
            for a, b in zip(indexed.doc_offsets[:-1], indexed.doc_offsets[1:], strict=True)]


def test_chat_jsonl_matches_encode_dialog(model: Path, tmp_path: Path) -> None:
    """Dialogs are encode_dialog's ids and mask; the text documents beside them are unchanged
    and all targets (mask 1); the summary counts both."""
    text = _write_text(tmp_path / "t.txt", DOCS[:2])
    chat = _write_records(tmp_path / "c.jsonl", CHAT_RECORDS)
    summary = preprocess([text, chat], tmp_path / "out" / "m", model, progress=False)
    dialogs = _dialogs(model, CHAT_RECORDS)
    texts = _expected(model, DOCS[:2])
    assert _documents(tmp_path / "out" / "m") == texts + [ids for ids, _ in dialogs]
    assert _masks(tmp_path / "out" / "m") == ([[1] * len(t) for t in texts]
                                              + [[int(b) for b in mask] for _, mask in dialogs])
    masked = sum(m.count(False) for _, m in dialogs)
    assert summary["chat_documents"] == 4 and summary["documents"] == 6
    assert summary["masked_tokens"] == masked
    assert summary["unmasked_tokens"] == summary["tokens"] - masked
    assert summary["loss_mask"] == f"{tmp_path / 'out' / 'm'}.mask"
    assert _outputs(tmp_path / "out") == ["m.bin", "m.idx", "m.mask", "m.summary.json"]


def test_text_only_corpus_has_no_mask(small_model: Path, tmp_path: Path) -> None:
    summary = preprocess([_write_jsonl(tmp_path / "a.jsonl", DOCS)], tmp_path / "t", small_model,
                         progress=False)
    assert IndexedTokens(tmp_path / "t").loss_mask is None and summary["loss_mask"] is None
    assert summary["chat_documents"] == summary["masked_tokens"] == 0
    assert not (tmp_path / "t.mask").exists()


def test_chat_workers_one_and_two_write_identical_files(
    small_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preprocess_module, "CHUNK_DOCS", 3)  # many chunks in flight
    records = [dict(CHAT_RECORDS[i % 4]) for i in range(40)]
    for i, record in enumerate(records):
        if "prompt" in record:
            record["prompt"] += f" number {i}"
    inputs = [_write_text(tmp_path / "a.txt", DOCS), _write_records(tmp_path / "b.jsonl", records),
              _write_jsonl(tmp_path / "c.jsonl", DOCS)]
    for workers in (1, 2):
        preprocess(inputs, tmp_path / f"w{workers}", small_model, workers=workers,
                   progress=False, max_tokens=30)
    for suffix in (".bin", ".idx", ".mask"):
        assert (tmp_path / f"w1{suffix}").read_bytes() == (tmp_path / f"w2{suffix}").read_bytes()
    summaries = [json.loads((tmp_path / f"w{w}.summary.json").read_text()) for w in (1, 2)]
    for key in ("documents", "tokens", "chat_documents", "masked_tokens", "dropped_overlong",
                "truncated_overlong"):
        assert summaries[0][key] == summaries[1][key], key
    assert summaries[0]["dropped_overlong"] > 0  # the limit did bite


def test_overlong_documents_dropped_or_truncated_and_counted(
    small_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dialogs = _dialogs(small_model, CHAT_RECORDS)
    lengths = sorted(len(ids) for ids, _ in dialogs)
    limit = lengths[1]  # two dialogs fit, two are longer
    long_dialogs = sum(len(ids) > limit for ids, _ in dialogs)
    docs = [*DOCS, "a long document of many words " * 20]
    texts = _expected(small_model, docs)
    long_texts = sum(len(t) > limit for t in texts)
    assert long_dialogs == 2 and long_texts >= 1
    chat = _write_records(tmp_path / "c.jsonl", CHAT_RECORDS)
    text = _write_text(tmp_path / "t.txt", docs)
    # defaults: a dialog is dropped, a text truncated
    summary = preprocess([chat, text], tmp_path / "d", small_model, max_tokens=limit,
                         progress=False)
    kept = [(ids, mask) for ids, mask in dialogs if len(ids) <= limit]
    assert _documents(tmp_path / "d") == [ids for ids, _ in kept] + [t[:limit] for t in texts]
    assert summary["dropped_overlong"] == long_dialogs
    assert summary["truncated_overlong"] == long_texts
    assert summary["documents"] == len(CHAT_RECORDS) - long_dialogs + len(docs)
    # --overlong truncate: the dialogs are cut, their masks with them
    argv = [str(chat), "--tokenizer", str(small_model), "--output-prefix", str(tmp_path / "t"),
            "--max-tokens", str(limit), "--overlong", "truncate", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["truncated_overlong"] == long_dialogs
    assert out.err.strip().splitlines()[-1] == (f"[preprocess] documents over --max-tokens "
                                                f"{limit}: 0 dropped, 2 truncated (of 4)")
    assert _documents(tmp_path / "t") == [ids[:limit] for ids, _ in dialogs]
    assert _masks(tmp_path / "t") == [[int(b) for b in mask[:limit]] for _, mask in dialogs]
    # --overlong drop applies to text as well
    summary = preprocess([text], tmp_path / "x", small_model, max_tokens=limit, overlong="drop",
                         progress=False)
    assert _documents(tmp_path / "x") == [t for t in texts if len(t) <= limit]
    assert summary["dropped_overlong"] == long_texts and summary["truncated_overlong"] == 0


def test_every_document_dropped_is_an_error(small_model: Path, tmp_path: Path) -> None:
    chat = _write_records(tmp_path / "c.jsonl", CHAT_RECORDS)
    with pytest.raises(SourceError, match="all 4 documents are longer than --max-tokens 3"):
        preprocess([chat], tmp_path / "out" / "n", small_model, max_tokens=3, progress=False)
    assert not (tmp_path / "out").exists()


def test_text_corpus_over_a_chat_prefix_removes_the_stale_mask(
    small_model: Path, tmp_path: Path
) -> None:
    prefix = tmp_path / "p"
    chat = _write_records(tmp_path / "c.jsonl", CHAT_RECORDS)
    preprocess([chat], prefix, small_model, progress=False)
    assert IndexedTokens(prefix).loss_mask is not None
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9\n")
    before = {name: (tmp_path / name).read_bytes() for name in _outputs(tmp_path)}
    with pytest.raises(SourceError):  # a failed text run leaves the chat corpus, mask included
        preprocess([bad], prefix, small_model, progress=False)
    assert {name: (tmp_path / name).read_bytes() for name in _outputs(tmp_path)} == before
    preprocess([_write_text(tmp_path / "t.txt", DOCS)], prefix, small_model, progress=False)
    assert IndexedTokens(prefix).loss_mask is None
    assert sorted(p.name for p in tmp_path.glob("p.*")) == ["p.bin", "p.idx", "p.summary.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries
    assert _documents(prefix) == _expected(small_model, DOCS)


def test_truncated_or_long_mask_is_a_clear_error(small_model: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "p"
    preprocess([_write_records(tmp_path / "c.jsonl", CHAT_RECORDS)], prefix, small_model,
               progress=False)
    mask = Path(f"{prefix}.mask")
    data = mask.read_bytes()
    n = len(data)
    mask.write_bytes(data[:-3])
    with pytest.raises(IndexedFormatError, match=rf"loss mask {mask} is truncated: {n - 3} bytes, "
                                                 rf"index .* says {n} tokens"):
        IndexedTokens(prefix)
    cfg = DataConfig(train=[str(prefix)], valid=[str(prefix)], seq_len=8)
    with pytest.raises(ConfigError, match=rf"^data.train\[0\]={prefix}: loss mask .* is truncated"
                                          r".*\(re-create it with megallama-preprocess\)$"):
        check_data_files(cfg, preset("tiny", vocab_size=500))
    mask.write_bytes(data + b"\x01")
    with pytest.raises(IndexedFormatError, match="longer than its index"):
        IndexedTokens(prefix)
    mask.write_bytes(data)
    check_data_files(cfg, preset("tiny", vocab_size=500))  # intact again: no error


def test_bad_dialogs_are_skipped_and_counted_with_skip_bad_json(
    small_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = [CHAT_RECORDS[0], {"prompt": "no response"}, CHAT_RECORDS[1],
               {"messages": [_msg("user", "a"), _msg("user", "b")]}, {"text": "a text record"}]
    source = _write_records(tmp_path / "c.jsonl", records)
    with pytest.raises(SourceError, match=rf"^{source}:2: bad dialog: 'prompt' without 'response'"):
        preprocess([source], tmp_path / "f", small_model, progress=False)
    summary = preprocess([source], tmp_path / "s", small_model, on_bad_json="skip",
                         progress=False)
    assert summary["skipped_bad_json_lines"] == 3 and summary["chat_documents"] == 2
    assert _documents(tmp_path / "s") == [ids for ids, _ in _dialogs(small_model, CHAT_RECORDS[:2])]
    err = capsys.readouterr().err
    assert all(f"{source}:{line}:" in err for line in (2, 4, 5))


def test_progress_bar_counts_overlong_documents(
    small_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = sorted(len(ids) for ids, _ in _dialogs(small_model, CHAT_RECORDS))[1]
    terminal = _Tty()
    monkeypatch.setattr(sys, "stderr", terminal)
    preprocess([_write_records(tmp_path / "c.jsonl", CHAT_RECORDS)], tmp_path / "o", small_model,
               max_tokens=limit)
    lines = terminal.getvalue().rstrip("\n").split("\n")
    assert lines[-1] == (f"[preprocess] documents over --max-tokens {limit}: 2 dropped, "
                         "0 truncated (of 4)")
    bar = lines[-2].split("\r")[-1]
    assert bar.startswith("[preprocess]: 100%") and "2 docs" in bar
    assert "overlong: 2 dropped, 0 truncated" in bar


def test_failed_publish_over_a_chat_prefix_keeps_its_mask(
    small_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A text corpus whose publication fails (the summary's rename) over a chat corpus: the
    older .bin/.idx/.summary.json and the .mask moved aside for it are all put back."""
    import errno
    import os

    prefix = tmp_path / "p"
    preprocess([_write_records(tmp_path / "c.jsonl", CHAT_RECORDS)], prefix, small_model,
               progress=False)
    text = _write_text(tmp_path / "t.txt", DOCS)
    before = {name: (tmp_path / name).read_bytes() for name in _outputs(tmp_path)}
    real_replace = os.replace

    def failing_replace(src, dst):
        if ".summary.json.tmp" in str(src):
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="Input/output error"):
        preprocess([text], prefix, small_model, progress=False)
    assert {name: (tmp_path / name).read_bytes() for name in _outputs(tmp_path)} == before
    assert IndexedTokens(prefix).loss_mask is not None
