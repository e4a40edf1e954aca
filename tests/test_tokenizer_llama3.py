"""Llama 3's tiktoken tokenizer against Meta's reference ``Tokenizer`` (llama-models 0.3.0): ids on
held-out text of many scripts, whitespace runs, digits, emoji and texts past tiktoken's 400k /
25k-character cuts; the file decides the implementation; preprocessing writes int32 tokens; the HF
tokenizer files written from the tiktoken file give the same ids under AutoTokenizer."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from megallama.data import tiktoken_bpe
from megallama.data.indexed import IndexedTokens
from megallama.data.preprocess import preprocess
from megallama.data.tiktoken_bpe import TiktokenTokenizer, split_for_tiktoken
from megallama.data.tokenizer import SentencePieceTokenizer, Tokenizer, TokenizerError
from tests.conftest import require_llama3_tokenizer, require_module

SCRIPTS = [
    "The quick brown fox jumps over the lazy dog. I'll say it's DON'T, we've, they'RE.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Ἐν ἀρχῇ ἦν ὁ λόγος.",
    "نص حكيم له سر قاطع وذو شأن عظيم مكتوب على ثوب أخضر",
    "דג סקרן שט בים מאוכזב ולפתע מצא חברה",
    "ऋषियों को सताने वाले दुष्ट राक्षसों के राजा रावण का सर्वनाश करने वाले",
    "เป็นมนุษย์สุดประเสริฐเลิศคุณค่า กว่าบรรดาฝูงสัตว์เดรัจฉาน",
    "我能吞下玻璃而不伤身体。私はガラスを食べられます。それは私を傷つけません。",
    "다람쥐 헌 쳇바퀴에 타고파. Ḱ̷ő̶m̵b̸i̴n̷i̶n̸g̵ c̷h̸a̵r̶s̷ e\u0301 ﬁ",
    "emoji 😀🎉👩‍👩‍👧‍👦🏳️‍🌈 flags 🇺🇸🇯🇵 and skin tones 👍🏽👋🏿",
    "digits 1234567890 12 345 6789012345 3.14159 -0.5e10 1,000,000 ١٢٣٤ ४२",
    "code:\n    if x:\n        return {'a': [1, 2]}  # comment\r\n\tdone()\n",
    "  leading spaces, trailing   ",
    "\n\n\nnewlines\n \n\t\n  \r\n\r\n\u00a0nbsp\u2009thin\u3000ideographic\u200bzwsp\x1c\x1d",
    "special token text <|begin_of_text|> <|eot_id|> <|start_header_id|>user<|end_header_id|>",
    "lone surrogate \ud800 and \udfff",
    "", " ", "\t", "a", "😀",
]


@pytest.fixture(scope="module")
def meta():  # Meta's reference tokenizer (llama_models.llama3.tokenizer.Tokenizer)
    module = require_module("llama_models.llama3.tokenizer")
    return module.Tokenizer(require_llama3_tokenizer())


def _long_texts() -> list[str]:
    """Texts past Meta's cuts: runs of 25,000 / 25,001 / 60,000 (non-)whitespace characters
    (also str.isspace-only ones), a run across the 400,000-character boundary, and 420,000
    characters of seeded mixed text."""
    rng = random.Random(25)
    words = [w for text in SCRIPTS[:11] for w in text.split()]
    mixed = "".join(rng.choice(words) + rng.choice([" ", "  ", "\n", "\t ", "", "\n\n   "])
                    for _ in range(60_000))[:420_000]
    assert len(mixed) == 420_000
    return [
        "x" * 25_000, "x" * 25_001, " " * 25_001 + "y", "a b" + "z" * 60_000 + " " * 60_000 + "c",
        "\u3000" * 30_000 + "\x1c" * 26_000 + "\u200b" * 26_000 + "😀" * 26_000,
        "w " * 190_000 + "q" * 50_000 + " tail",  # a run across character 400,000
        mixed,
    ]


def test_reference_ids_and_specials(llama3_tokenizer: Tokenizer) -> None:
    tok = llama3_tokenizer
    assert isinstance(tok, TiktokenTokenizer) and tok.chat_format == "llama3"
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (128256, 128000, 128001, 128004)
    assert tok.stop_ids == (128001, 128008, 128009)
    specials = tok.special_tokens
    assert len(specials) == 256 and specials["<|start_header_id|>"] == 128006
    assert specials["<|eot_id|>"] == 128009 and specials["<|reserved_special_token_245|>"] == 128255
    assert tok.encode("Hello world") == [128000, 9906, 1917]
    assert tok.encode("Hello world", bos=False, eos=True) == [9906, 1917, 128001]
    assert tok.id_to_piece(9906) == "Hello" and tok.id_to_piece(128009) == "<|eot_id|>"


@pytest.mark.parametrize("text", SCRIPTS)
def test_ids_equal_metas(llama3_tokenizer: Tokenizer, meta, text: str) -> None:
    ids = llama3_tokenizer.encode(text, bos=True, eos=True)
    assert ids == meta.encode(text, bos=True, eos=True)
    assert llama3_tokenizer.decode(ids[1:-1]) == meta.decode(ids[1:-1])
    if "\ud800" not in text:  # a lone surrogate is not UTF-8: tiktoken replaces it
        assert llama3_tokenizer.decode(ids[1:-1]) == text


def test_long_texts_equal_metas_cuts(llama3_tokenizer: Tokenizer, meta) -> None:
    texts = _long_texts()
    for text in texts:
        ours = llama3_tokenizer.encode(text, bos=False)
        assert ours == meta.encode(text, bos=False, eos=False), (len(text), text[:20])
        assert llama3_tokenizer.decode(ours) == text
    assert llama3_tokenizer.encode_batch(texts[:3], num_threads=2) == [
        llama3_tokenizer.encode(t) for t in texts[:3]]
    # the cuts themselves are Meta's, piece for piece; also for runs of 24,990..25,010
    # characters at random offsets (across the positions 25000*k that the fast check measures)
    rng = random.Random(3)
    for _ in range(6):
        runs = [rng.choice([rng.randint(1, 9), rng.randint(24_990, 25_010)]) for _ in range(12)]
        texts.append("".join(("\u3000" if i % 2 else "z") * n for i, n in enumerate(runs)))
    texts += [" " * 20_000 + "z" * 25_001 + " ", " " * 20_000 + "z" * 25_000 + " ",
              "z" * 20_000 + "\n" * 25_001, "z" * 20_000 + "\n" * 25_000 + "z"]
    for text in texts:
        metas = [piece for i in range(0, len(text), 400_000)
                 for piece in meta._split_whitespaces_or_nonwhitespaces(text[i:i + 400_000],
                                                                        25_000)]
        assert list(split_for_tiktoken(text)) == metas


def test_decode_checks_ids_and_pickles(llama3_tokenizer: Tokenizer) -> None:
    tok = llama3_tokenizer
    ids = tok.encode("pickled 😀")
    assert tok.decode(np.array(ids)) == tok.decode(torch.tensor(ids)) == "<|begin_of_text|>pickled 😀"
    with pytest.raises(TokenizerError, match=r"cannot decode id -1"):
        tok.decode([*ids, -1])
    with pytest.raises(TokenizerError, match=r"128256"):
        tok.decode([128256])
    with pytest.raises(TypeError):
        tok.encode(ids)  # type: ignore[arg-type]
    clone = pickle.loads(pickle.dumps(tok))
    assert type(clone) is TiktokenTokenizer and clone.encode("pickled 😀") == ids


def _bpe_file(path: Path, extra: list[bytes]) -> Path:
    """A tiktoken BPE file: the 256 bytes, then ``extra`` merges."""
    import base64

    tokens = [bytes([b]) for b in range(256)] + extra
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return path


def test_the_file_chooses_the_implementation(tmp_path: Path, llama_tokenizer_path: Path) -> None:
    small = Tokenizer(_bpe_file(tmp_path / "bpe.model", [b"ab", b"abc"]))
    assert isinstance(small, TiktokenTokenizer) and small.vocab_size == 256 + 2 + 256
    assert small.bos_id == 258 and small.encode("abc abd", bos=False) == [257, 32, 256, 100]
    assert isinstance(Tokenizer(llama_tokenizer_path), SentencePieceTokenizer)
    assert Tokenizer(llama_tokenizer_path).stop_ids == (2,)
    assert Tokenizer(llama_tokenizer_path).chat_format == "llama2"


@pytest.mark.parametrize(("content", "expected"), [
    (b"IQ== 0\nIg== 1\nnot base64!! x\n", r"line 3: not 'base64-token rank'"),
    (b"IQ== 0\nIg== 5\n", r"do not have the distinct ranks 0..n-1"),
    (b"IQ== 0\nIQ== 1\n", r"do not have the distinct ranks 0..n-1"),  # a token twice
])
def test_corrupt_tiktoken_file_is_one_line(tmp_path: Path, content: bytes, expected: str) -> None:
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(content)
    with pytest.raises(TokenizerError, match=expected) as info:
        Tokenizer(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_missing_tiktoken_names_the_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tiktoken_bpe, "tiktoken", None)
    with pytest.raises(TokenizerError, match=r"tiktoken is not installed: pip install tiktoken"):
        Tokenizer(_bpe_file(tmp_path / "bpe.model", []))


def test_preprocess_writes_int32_llama3_tokens(tmp_path: Path, llama3_tokenizer: Tokenizer) -> None:
    texts = [SCRIPTS[0], SCRIPTS[7], SCRIPTS[9], "x" * 30_000 + " end"]
    src = tmp_path / "docs.jsonl"
    import json

    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    summary = preprocess([src], tmp_path / "out", llama3_tokenizer.path, progress=False)
    assert summary["vocab_size"] == 128256 and summary["dtype"] == "int32"
    data = IndexedTokens(tmp_path / "out")
    assert data.dtype == np.dtype("<i4") and data.vocab_size == 128256
    offsets = data.doc_offsets
    assert [data.tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)] == [
        llama3_tokenizer.encode(t, bos=True, eos=True) for t in texts]
    del data
    # a run's data checks: data.tokenizer is the Llama 3 file (passes) or Llama 2's (one line)
    from megallama.config import ConfigError, preset
    from megallama.config.train_config import DataConfig
    from megallama.data.checks import check_data_files
    from tests.conftest import LLAMA_TOKENIZER

    model = preset("tiny", vocab_size=128256)
    check_data_files(DataConfig(train=[str(tmp_path / "out")], seq_len=8,
                                tokenizer=str(llama3_tokenizer.path)), model)
    if LLAMA_TOKENIZER.is_file():
        cfg = DataConfig(train=[str(tmp_path / "out")], seq_len=8, tokenizer=str(LLAMA_TOKENIZER))
        with pytest.raises(ConfigError, match=r"model vocab_size 128256 != tokenizer vocab_size "
                                              r"32000 .* tokenized with 128256 pieces as well"):
            check_data_files(cfg, model)


def test_hf_tokenizer_files_equal_tiktoken(tmp_path: Path, llama3_tokenizer: Tokenizer) -> None:
    transformers = require_module("transformers")
    from megallama.data.chat import encode_dialog_prompt
    from megallama.data.hf_tokenizer import write_hf_tiktoken_tokenizer

    written = write_hf_tiktoken_tokenizer(llama3_tokenizer.path, tmp_path, 8192)
    assert sorted(p.name for p in written) == sorted(p.name for p in tmp_path.iterdir())
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(hf) == 128256 and (hf.bos_token_id, hf.eos_token_id) == (128000, 128001)
    assert hf.model_max_length == 8192
    for text in SCRIPTS[:14]:
        ids = llama3_tokenizer.encode(text)
        assert hf(text).input_ids == ids, text
        assert hf.decode(ids[1:]) == text
    # unlike Meta's encode, an HF tokenizer reads the text of a special token as that token
    assert hf("<|eot_id|>", add_special_tokens=False).input_ids == [128009]
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    rendered = hf.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
    rendered = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
    assert rendered == encode_dialog_prompt(llama3_tokenizer, dialog)


def test_hf_tokenizer_files_refuse_sentencepiece(tmp_path: Path, llama_tokenizer_path) -> None:
    from megallama.data.hf_tokenizer import write_hf_tiktoken_tokenizer

    with pytest.raises(TokenizerError, match="not a tiktoken BPE file"):
        write_hf_tiktoken_tokenizer(llama_tokenizer_path, tmp_path, 4096)
    assert not list(tmp_path.iterdir())
