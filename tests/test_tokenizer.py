"""Tokenizer wrapper (against the real Llama 2 model) and the Llama-style tokenizer trainer."""

from __future__ import annotations

import gzip
import json
import lzma
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from megallama.data.sources import SourceError
from megallama.data.tokenizer import Tokenizer, TokenizerError, VocabMismatchError, check_vocab
from megallama.data.tokenizer_trainer import (
    _split_long,
    iter_sentences,
    main,
    sample_sentences,
    train_tokenizer,
)
from tests.conftest import REQUIRE_ASSETS, require_llama_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
LLAMA_MODEL = SHARED / "assets" / "llama2-tokenizer" / "tokenizer.model"
SOTU_TRAIN = REPO / "data" / "sotu" / "train.txt.gz"
needs_llama = pytest.mark.skipif(
    not LLAMA_MODEL.is_file() and not REQUIRE_ASSETS,  # required in CI: then the test fails
    reason=f"real Llama 2 tokenizer not found at {LLAMA_MODEL} (the shared/ assets directory "
    "beside the checkout)",
)

ROUND_TRIP_TEXTS = [
    "Hello this is a test",
    " leading space",
    "   three leading spaces",
    "\tleading tab\tand\ttabs",
    "\nleading newline\n\nblank line, trailing newline\n",
    "trailing spaces   ",
    "emoji 😀🎉👩‍👩‍👧 in text",
    "中文 日本語のテキスト 한국어",
    " 中文 with a leading space",
    "mixed\u00a0nbsp and e\u0301 combining, ﬁ ligature",
    "digits 1234567890 and 3.14159",
    "code:\n    if x:\n        return {'a': [1, 2]}\n",
    "",
    " ",
    "\r\nwindows line\r\n",
]


@pytest.fixture(scope="module")
def llama() -> Tokenizer:
    return Tokenizer(require_llama_tokenizer())


def _corpus_slice(tmp: Path, chars: int = 150_000) -> Path:
    """The start of the demo corpus (whole lines), as a plain text file."""
    with gzip.open(SOTU_TRAIN, "rt", encoding="utf-8") as f:
        text = f.read(chars)
    text = text[: text.rfind(" ")]  # whole words
    path = tmp / "slice.txt"
    path.write_text(text + "\n\nA second document.\nWith two lines.\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("tok")
    return train_tokenizer([_corpus_slice(tmp)], tmp / "small", vocab_size=600, seed=3)


def _proto(path: Path) -> model_pb2.ModelProto:
    proto = model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


# --- the real Llama 2 tokenizer -------------------------------------------------------------


@needs_llama
def test_llama_reference_ids(llama: Tokenizer) -> None:
    assert llama.encode("Hello this is a test") == [1, 15043, 445, 338, 263, 1243]
    assert llama.encode("Hello this is a test", bos=False, eos=True) == [
        15043, 445, 338, 263, 1243, 2,
    ]  # fmt: skip
    assert (llama.vocab_size, llama.bos_id, llama.eos_id, llama.pad_id, llama.unk_id) == (
        32000, 1, 2, -1, 0,
    )  # fmt: skip
    assert llama.byte_fallback
    assert llama.id_to_piece(15043) == "▁Hello"


@needs_llama
@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_llama_round_trip(llama: Tokenizer, text: str) -> None:
    ids = llama.encode(text, bos=True, eos=True)
    assert llama.unk_id not in ids  # byte fallback: nothing is unknown
    assert llama.decode(ids) == text
    assert llama.decode(ids[1:-1]) == text


@needs_llama
def test_llama_dummy_prefix_leading_space(llama: Tokenizer) -> None:
    # The dummy prefix makes " leading" encode as "▁" + "▁leading"; decode must give the
    # space back instead of eating it as the dummy prefix.
    ids = llama.encode(" leading", bos=False)
    assert [llama.id_to_piece(i) for i in ids] == ["▁", "▁leading"]
    assert llama.decode(ids) == " leading"
    assert llama.decode(llama.encode("leading", bos=False)) == "leading"
    # Byte-fallback emoji after the prefix
    assert llama.decode(llama.encode(" 😀", bos=False)) == " 😀"


@needs_llama
def test_llama_meta_symbol_limitation(llama: Tokenizer) -> None:
    # Documented: U+2581 in the input is SentencePiece's space symbol and decodes as a space.
    assert llama.encode("▁x") == llama.encode(" x")
    assert llama.decode(llama.encode("▁x")) == " x"


@needs_llama
def test_decode_accepts_arrays_and_rejects_padding(llama: Tokenizer) -> None:
    ids = llama.encode("Hello this is a test")
    assert llama.decode(np.array(ids)) == "Hello this is a test"
    assert llama.decode(torch.tensor(ids)) == "Hello this is a test"
    with pytest.raises(TokenizerError, match=r"cannot decode id -1"):
        llama.decode(ids + [-1])
    with pytest.raises(TokenizerError, match=r"32000"):
        llama.decode([32000])
    with pytest.raises(TypeError):
        llama.encode(ids)  # type: ignore[arg-type]


@needs_llama
def test_tokenizer_pickles_by_path(llama: Tokenizer) -> None:
    clone = pickle.loads(pickle.dumps(llama))
    assert clone.path == llama.path
    assert clone.encode("pickled 😀") == llama.encode("pickled 😀")


# --- load errors and the vocabulary check ---------------------------------------------------


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(TokenizerError) as info:
        Tokenizer(missing)
    assert str(missing) in str(info.value) and "not found" in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"", "empty"), (b"this is not a protobuf \xff\xfe" * 10, "not a valid SentencePiece")],
)
def test_corrupt_model_is_a_clear_error(tmp_path: Path, content: bytes, expected: str) -> None:
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(content)
    with pytest.raises(TokenizerError, match=expected) as info:
        Tokenizer(bad)
    assert str(bad) in str(info.value)
    assert "\n" not in str(info.value)


def test_directory_instead_of_model(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not a file"):
        Tokenizer(tmp_path)


def test_check_vocab() -> None:
    check_vocab(32000, 32000, "tok.model")
    with pytest.raises(VocabMismatchError) as info:
        check_vocab(8000, 32000, "/x/tok.model")
    message = str(info.value)
    assert "32000" in message and "8000" in message and "/x/tok.model" in message
    assert isinstance(info.value, TokenizerError) and isinstance(info.value, ValueError)


# --- the trainer ------------------------------------------------------------------------------


def test_trained_model_has_llama_settings(small_model: Path) -> None:
    proto = _proto(small_model)
    norm, spec = proto.normalizer_spec, proto.trainer_spec
    assert norm.name == "identity" and norm.add_dummy_prefix and not norm.remove_extra_whitespaces
    assert spec.model_type == model_pb2.TrainerSpec.BPE
    assert spec.byte_fallback and spec.split_digits and spec.allow_whitespace_only_pieces
    assert (spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id) == (0, 1, 2, -1)
    assert spec.vocab_size == 600 and len(proto.pieces) == 600


def test_trained_model_settings_equal_metas(small_model: Path) -> None:
    """Every setting that is not about the corpus equals Meta's tokenizer's (skipped, with its
    reason, only where the real tokenizer is absent; failing in CI)."""
    proto = _proto(small_model)
    norm, spec = proto.normalizer_spec, proto.trainer_spec
    meta = _proto(require_llama_tokenizer())
    for field in meta.normalizer_spec.DESCRIPTOR.fields:
        ours, theirs = getattr(norm, field.name), getattr(meta.normalizer_spec, field.name)
        assert ours == theirs, field.name
    corpus_fields = {"input", "input_format", "model_prefix", "vocab_size", "num_threads"}
    corpus_fields |= {"input_sentence_size", "shuffle_input_sentence"}  # sampled by us
    for field in meta.trainer_spec.DESCRIPTOR.fields:
        if field.name not in corpus_fields:
            ours, theirs = getattr(spec, field.name), getattr(meta.trainer_spec, field.name)
            assert ours == theirs, field.name


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_trained_model_round_trips(small_model: Path, text: str) -> None:
    tok = Tokenizer(small_model)
    ids = tok.encode(text, eos=True)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text


def test_trained_model_splits_digits(small_model: Path) -> None:
    tok = Tokenizer(small_model)
    pieces = [tok.id_to_piece(i) for i in tok.encode("1790", bos=False)]
    assert [p.lstrip("▁") for p in pieces if p.lstrip("▁")] == ["1", "7", "9", "0"]


def test_training_is_deterministic_and_reads_compressed_jsonl(
    small_model: Path, tmp_path: Path
) -> None:
    source = _corpus_slice(tmp_path)
    again = train_tokenizer([source], tmp_path / "again", vocab_size=600, seed=3)
    assert again.read_bytes() == small_model.read_bytes()
    # the same documents as .jsonl.gz and .txt.xz give the same model
    docs = source.read_text(encoding="utf-8").split("\n\n")
    jsonl = tmp_path / "slice.jsonl.gz"
    with gzip.open(jsonl, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d.strip("\n")}) + "\n" for d in docs)
    xz = tmp_path / "slice.txt.xz"
    xz.write_bytes(lzma.compress(source.read_bytes()))
    for i, path in enumerate([jsonl, xz]):
        model = train_tokenizer([path], tmp_path / f"c{i}", vocab_size=600, seed=3)
        assert model.read_bytes() == small_model.read_bytes(), path.name


def test_sentence_sampling_is_seeded_and_ordered() -> None:
    sentences = [f"s{i}" for i in range(1000)]
    sample, seen = sample_sentences(iter(sentences), 100, seed=7)
    assert seen == 1000 and len(sample) == 100
    assert sample == sorted(sample, key=lambda s: int(s[1:]))  # corpus order kept
    assert sample == sample_sentences(iter(sentences), 100, seed=7)[0]
    assert sample != sample_sentences(iter(sentences), 100, seed=8)[0]
    assert sample_sentences(iter(sentences[:50]), 100, seed=7) == (sentences[:50], 50)


def test_long_lines_are_split_below_the_sentencepiece_limit() -> None:
    word = "ünïcödé"  # 2-byte characters
    sentence = " ".join([word] * 200) + " " + "x" * 300
    pieces = list(_split_long(sentence, 64))
    assert "".join(pieces) == sentence
    assert all(0 < len(p.encode("utf-8")) <= 64 for p in pieces)
    doc = "First sentence. Second one! Third?\nNew line " + sentence
    out = list(iter_sentences([doc], max_bytes=64))
    assert out[:3] == ["First sentence.", "Second one!", "Third?"]
    assert all(len(s.encode("utf-8")) <= 64 for s in out)


def test_too_large_vocab_fails_cleanly(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("only a few words here\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tiny\.txt.*(?i:vocab)"):
        train_tokenizer([tiny], tmp_path / "out" / "tok", vocab_size=5000)
    assert not [p for p in tmp_path.rglob("*") if "tok" in p.name]  # no model, no temp file
    with pytest.raises(TokenizerError, match="too small"):
        train_tokenizer([tiny], tmp_path / "tok", vocab_size=100)


def test_trainer_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _corpus_slice(tmp_path, chars=60_000)
    prefix = tmp_path / "cli" / "tok"
    assert main([str(source), "--output-prefix", str(prefix), "--vocab-size", "400"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == f"{prefix}.model"
    assert "training sentences" in out.err
    assert Tokenizer(f"{prefix}.model").vocab_size == 400
    assert main([str(tmp_path / "missing.txt"), "--output-prefix", str(prefix)]) == 2
    assert "input file not found" in capsys.readouterr().err
    with pytest.raises(SourceError):
        train_tokenizer([], prefix)


def test_missing_assets_skip_locally_and_fail_in_ci(monkeypatch) -> None:
    import tests.conftest as conftest

    monkeypatch.setattr(conftest, "LLAMA_TOKENIZER", Path("/nonexistent/tokenizer.model"))
    monkeypatch.setattr(conftest, "REQUIRE_ASSETS", False)
    with pytest.raises(pytest.skip.Exception, match="not found at /nonexistent"):
        conftest.require_llama_tokenizer()
    monkeypatch.setattr(conftest, "REQUIRE_ASSETS", True)
    with pytest.raises(pytest.fail.Exception, match="MEGALLAMA_REQUIRE_ASSETS=1"):
        conftest.require_llama_tokenizer()
