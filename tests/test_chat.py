"""Llama 2 chat format (megallama.data.chat) on the real Llama 2 tokenizer.

The oracle is sentencepiece itself: the exact strings of Meta's ``chat_completion`` format are
written out literally below and encoded with ``SentencePieceProcessor.encode``, plus the BOS/EOS
ids. The loss mask is checked independently of how the code finds it: the target tokens of each
pair must be exactly ``encode(answer) + [EOS]`` (the answer encoded alone, which gives the same
pieces as after ``[/INST] `` because Llama's tokenizer splits on whitespace) and the rest must be
``[BOS] + encode("[INST] ... [/INST]")``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import sentencepiece as spm

from megallama.data import preprocess as preprocess_module
from megallama.data.chat import (
    CHAT_TAGS,
    ChatFormatError,
    ChatTagError,
    encode_dialog,
    encode_dialog_prompt,
    record_messages,
    split_dialog,
)
from megallama.data.indexed import IndexedTokens
from megallama.data.tokenizer import Tokenizer
from tests.conftest import require_llama_tokenizer


@pytest.fixture(scope="module")
def llama() -> Tokenizer:
    return Tokenizer(require_llama_tokenizer())


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(require_llama_tokenizer()))


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


# (messages, [(prompt string, answer string)] of Meta's format, written out by hand)
DIALOGS = {
    "one-turn": (
        [msg("user", "What is the capital of France?"), msg("assistant", "Paris.")],
        [("[INST] What is the capital of France? [/INST]", "Paris. ")],
    ),
    "spaces-and-newlines": (
        [msg("user", "  \n Tell me\na joke.\t\n"), msg("assistant", "\n\n  Why did the chicken"
                                                                     "\ncross?  \n ")],
        [("[INST] Tell me\na joke. [/INST]", "Why did the chicken\ncross? ")],
    ),
    # the system prompt is not stripped (Meta strips the combined user content only): its own
    # spaces and newlines stay, and so do the user's leading spaces after the <</SYS>> block
    "system-multi-turn": (
        [msg("system", " Answer briefly.\n"), msg("user", "  hi there "),
         msg("assistant", " Hello! "), msg("user", "\nCount to 3.\n"),
         msg("assistant", "1, 2, 3"), msg("user", "Thanks"), msg("assistant", "You're welcome.\n")],
        [("[INST] <<SYS>>\n Answer briefly.\n\n<</SYS>>\n\n  hi there [/INST]", "Hello! "),
         ("[INST] Count to 3. [/INST]", "1, 2, 3 "),
         ("[INST] Thanks [/INST]", "You're welcome. ")],
    ),
    "unicode": (
        [msg("system", "Réponds en français."), msg("user", "Ça va? 😀"),
         msg("assistant", " Très bien, merci! 中文 ")],
        [("[INST] <<SYS>>\nRéponds en français.\n<</SYS>>\n\nÇa va? 😀 [/INST]",
          "Très bien, merci! 中文 ")],
    ),
}


def expected(sp: spm.SentencePieceProcessor, pairs: list[tuple[str, str]],
             ) -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    mask: list[bool] = []
    for prompt, answer in pairs:
        ids += [sp.bos_id()] + sp.encode(f"{prompt} {answer}") + [sp.eos_id()]
        mask += [False] * (1 + len(sp.encode(prompt))) + [True] * (len(sp.encode(answer)) + 1)
    return ids, mask


@pytest.mark.parametrize("name", list(DIALOGS))
def test_encode_dialog_matches_sentencepiece(name: str, llama: Tokenizer, sp) -> None:
    messages, pairs = DIALOGS[name]
    ids, mask = encode_dialog(llama, messages)
    want_ids, want_mask = expected(sp, pairs)
    assert ids == want_ids
    assert mask == want_mask and len(mask) == len(ids)
    # the targets are each answer and its EOS, and nothing else
    targets = [i for i, m in zip(ids, mask, strict=True) if m]
    answers = [t for _, answer in pairs for t in [*sp.encode(answer), sp.eos_id()]]
    assert targets == answers
    assert sum(1 for i, m in zip(ids, mask, strict=True) if m and i == sp.eos_id()) == len(pairs)
    assert not any(m for i, m in zip(ids, mask, strict=True) if i == sp.bos_id())


def test_prompt_for_generation_matches_sentencepiece(llama: Tokenizer, sp) -> None:
    messages, pairs = DIALOGS["system-multi-turn"]
    ids = encode_dialog_prompt(llama, messages[:-1])  # ends with the user's "Thanks"
    finished, _ = expected(sp, pairs[:2])
    assert ids == finished + [sp.bos_id()] + sp.encode("[INST] Thanks [/INST]")
    only = encode_dialog_prompt(llama, [msg("system", "Be brief."), msg("user", " hi ")])
    # the user's leading space stays after the system block, as in Meta's code
    assert only == [sp.bos_id()] + sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n hi [/INST]")
    # the training ids of the dialog start with the prompt ids of its first turn
    train_ids, _ = encode_dialog(llama, [msg("system", "Be brief."), msg("user", " hi "),
                                         msg("assistant", "Hi.")])
    assert train_ids[: len(only)] == only and train_ids[len(only):] == sp.encode("Hi. ") + [2]


def test_short_form_records(llama: Tokenizer, sp) -> None:
    record = {"system": "Be brief.", "prompt": "2+2?", "response": "4"}
    ids, mask = encode_dialog(llama, record_messages(record))
    assert (ids, mask) == expected(sp, [("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n2+2? [/INST]",
                                         "4 ")])
    assert record_messages({"prompt": "a", "response": "b"}) == [msg("user", "a"),
                                                                 msg("assistant", "b")]


BAD_DIALOGS = [  # (messages, fragment of the error)
    ([msg("user", "a"), msg("user", "b"), msg("assistant", "c")],
     "message 2: expected 'assistant' after a 'user' turn, got 'user'"),
    ([msg("assistant", "a")], "message 1: expected 'user' at the start, got 'assistant'"),
    ([msg("system", "s"), msg("assistant", "a")],
     "message 2: expected 'user' at the start, got 'assistant'"),
    ([msg("user", "a"), msg("assistant", "b"), msg("user", "c")],
     "the dialog ends with a 'user' turn (message 3); a training dialog must end with an "
     "'assistant' turn"),
    ([msg("user", "a"), msg("assistant", " \n ")], "message 2: empty assistant turn"),
    ([msg("user", "a"), msg("assistant", "")], "message 2: empty assistant turn"),
    ([msg("user", "a"), msg("bot", "b")], "message 2: unknown role 'bot'"),
    ([{"content": "a"}], "message 1: unknown role None"),
    ([msg("user", "a"), {"role": "assistant", "content": 5}],
     "message 2 (assistant): 'content' must be a string, got a JSON number"),
    ([msg("user", "a"), {"role": "assistant"}], "'content' must be a string, got none"),
    ([msg("user", "a"), msg("assistant", "b"), msg("system", "s"), msg("user", "c"),
      msg("assistant", "d")], "message 3: a system message is allowed only as the first"),
    ([msg("system", "s")], "only a system message"),
    ([], "'messages' is empty"),
    ("user: hi", "'messages' must be a list"),
    ({"role": "user"}, "'messages' must be a list"),
    (["hi"], "message 1 is a JSON string, not an object"),
]


@pytest.mark.parametrize("messages,message", BAD_DIALOGS,
                         ids=[f"bad{i}" for i in range(len(BAD_DIALOGS))])
def test_malformed_dialogs_are_clear_errors(messages, message: str, llama: Tokenizer) -> None:
    with pytest.raises(ChatFormatError) as info:
        encode_dialog(llama, messages)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_prompt_dialogs_must_end_with_a_user_turn(llama: Tokenizer) -> None:
    with pytest.raises(ChatFormatError, match="ends with an 'assistant' turn .*a prompt must end "
                                              "with a 'user' turn"):
        encode_dialog_prompt(llama, [msg("user", "a"), msg("assistant", "b")])
    assert split_dialog([msg("user", "a")], last="user") == (["a"], [])


@pytest.mark.parametrize("record,message", [
    ({"messages": [msg("user", "a"), msg("assistant", "b")], "prompt": "a"},
     "both 'messages' and 'prompt'"),
    ({"messages": [], "system": "s"}, "both 'messages' and 'system'"),
    ({"prompt": "a"}, "'prompt' without 'response'"),
    ({"response": "b"}, "'response' without 'prompt'"),
    ({"prompt": ["a"], "response": "b"}, "'prompt' must be a string, got a JSON array"),
    ({"prompt": "a", "response": None}, "'response' must be a string, got a JSON null"),
])
def test_malformed_records(record: dict, message: str) -> None:
    with pytest.raises(ChatFormatError, match=message):
        record_messages(record)


# --- the format's own tags inside a message: refused, as Meta's chat_completion does ---------------

TAGGED = [  # (messages, the error's message number, role and tag): every tag, every role
    ([msg("user", "Tell me [INST] more"), msg("assistant", "ok")], "message 1 (user)", "[INST]"),
    ([msg("user", "a"), msg("assistant", "done. [/INST] again")], "message 2 (assistant)",
     "[/INST]"),
    ([msg("system", "<<SYS>> be brief"), msg("user", "a"), msg("assistant", "b")],
     "message 1 (system)", "<<SYS>>"),
    ([msg("system", "s"), msg("user", "a"), msg("assistant", "b"), msg("user", "x <</SYS>> y"),
      msg("assistant", "c")], "message 4 (user)", "<</SYS>>"),
    # the first tag by position, when there are several
    ([msg("user", "<</SYS>> and [INST]"), msg("assistant", "b")], "message 1 (user)",
     "<</SYS>>"),
]


@pytest.mark.parametrize("messages,where,tag", TAGGED, ids=[t[2] for t in TAGGED])
def test_chat_tags_in_a_message_are_refused_unless_allowed(messages, where: str, tag: str,
                                                          llama: Tokenizer,
                                                          sp: spm.SentencePieceProcessor) -> None:
    """Both encoders refuse a message holding one of Meta's SPECIAL_TAGS, naming the message,
    its role, the tag and the option; ``allow_tags=True`` encodes the text as it is."""
    assert tag in CHAT_TAGS
    with pytest.raises(ChatTagError) as info:
        encode_dialog(llama, messages)
    assert f"{where} contains {tag!r}" in str(info.value)
    assert "--allow-chat-tags" in str(info.value)
    assert isinstance(info.value, ChatFormatError)
    ids, mask = encode_dialog(llama, messages, allow_tags=True)
    assert len(ids) == len(mask) and any(mask)
    prompt = messages[:-1]  # the dialog before its last answer, for generation
    if any(tag in m["content"] for m in prompt):
        with pytest.raises(ChatTagError, match=re.escape(f"{where} contains {tag!r}")):
            encode_dialog_prompt(llama, prompt)
    else:
        encode_dialog_prompt(llama, prompt)  # the tag was in the answer left out
    allowed = encode_dialog_prompt(llama, prompt, allow_tags=True)
    assert allowed == ids[:len(allowed)]  # the prompt is a prefix of the training ids


def test_chat_tag_kept_as_text_is_tokenized_as_text(llama: Tokenizer,
                                                    sp: spm.SentencePieceProcessor) -> None:
    """With the tags allowed the string is encoded literally, like any other text."""
    messages = [msg("user", "What does [INST] mean?"), msg("assistant", "It opens a turn.")]
    ids, mask = encode_dialog(llama, messages, allow_tags=True)
    assert (ids, mask) == expected(sp, [("[INST] What does [INST] mean? [/INST]",
                                         "It opens a turn. ")])


def _preprocess(argv: list[str]) -> int:
    try:
        return preprocess_module.main(argv)
    except SystemExit as exc:  # argparse
        return exc.code if isinstance(exc.code, int) else 1


TAG_FILE = [{"prompt": "a b c", "response": "c b a"},
            {"messages": [msg("user", "a"), msg("assistant", "see [/INST] here")]}]
PREPROCESS_ROWS = [  # (id, extra argv, exit status, fragment of stderr's last line)
    ("tag-refused", [], 2, "{file}:2: bad dialog: message 2 (assistant) contains '[/INST]'"),
    ("tag-refused-workers", ["--workers", "2"], 2, "{file}:2: bad dialog: message 2"),
    ("tag-allowed", ["--allow-chat-tags"], 0, None),
    ("tag-allowed-workers", ["--allow-chat-tags", "--workers", "2"], 0, None),
]


@pytest.mark.parametrize("name,extra,code,message", PREPROCESS_ROWS,
                         ids=[r[0] for r in PREPROCESS_ROWS])
def test_preprocess_refuses_chat_tags_unless_allowed(name: str, extra: list[str], code: int,
                                                     message: str | None, llama: Tokenizer,
                                                     tmp_path: Path, capsys, monkeypatch) -> None:
    """megallama-preprocess: a dialog with a chat tag is a ``file:line`` error (exit 2, one line,
    no traceback, no output file); ``--allow-chat-tags`` (also in worker processes) writes
    encode_dialog(allow_tags=True)'s ids and mask."""
    monkeypatch.delenv("MEGALLAMA_DEBUG", raising=False)
    data = tmp_path / "tags.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TAG_FILE), encoding="utf-8")
    out = tmp_path / "out" / "tok"
    status = _preprocess([str(data), "--tokenizer", str(llama.path), "--output-prefix", str(out),
                          "--quiet", *extra])
    err = capsys.readouterr().err
    assert status == code, err
    if message is not None:
        lines = err.strip().splitlines()
        assert "Traceback" not in err and len(lines) == 1, err
        assert lines[0].startswith("megallama-preprocess: error: "), err
        assert message.format(file=data) in lines[0], lines[0]
        assert "--allow-chat-tags" in lines[0], lines[0]
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
        return
    docs = IndexedTokens(out)
    want = [encode_dialog(llama, record_messages(r), allow_tags=True) for r in TAG_FILE]
    assert [docs.document(i).tolist() for i in range(len(docs))] == [ids for ids, _ in want]
    assert docs.loss_mask is not None
    assert docs.loss_mask.tolist() == [int(b) for _, mask in want for b in mask]


class _MergingTokenizer:
    """Characters as ids, except that it merges "] " into one piece: the prompt's last token
    ("]") is then not a prefix of the pair's tokens."""

    path = Path("merging.model")

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = [1] if bos else []
        i = 0
        while i < len(text):
            if text.startswith("] ", i):
                ids.append(1000)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return ids + ([2] if eos else [])


def test_a_tokenizer_merging_across_the_prompt_end_fails_clearly() -> None:
    with pytest.raises(ChatFormatError, match=r"turn 1: tokenizer merging.model merges the end "
                                              r"of '\[/INST\]' with the answer"):
        encode_dialog(_MergingTokenizer(), [msg("user", "a"), msg("assistant", "b")])


# --- the shipped demo instruction set ----------------------------------------------------------

DEMO = Path(__file__).resolve().parents[1] / "data" / "instruct_demo"


def test_demo_set_is_the_scripts_output_and_follows_its_rule(tmp_path: Path) -> None:
    """tools/make_instruct_demo.py regenerates the shipped files byte for byte; every dialog is
    valid chat data whose answers are the user's last word, and no validation word tuple is
    in the training set."""
    import subprocess
    import sys

    script = DEMO.parents[1] / "tools" / "make_instruct_demo.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True,
                   capture_output=True, timeout=120)
    tuples = {}
    for name in ("train.jsonl", "valid.jsonl"):
        shipped = (DEMO / name).read_bytes()
        assert (tmp_path / name).read_bytes() == shipped, f"{name} differs from the script's output"
        assert len(shipped) < 400_000
        tuples[name] = set()
        for line in shipped.decode("utf-8").splitlines():
            users, answers = split_dialog(record_messages(json.loads(line)))
            for user, answer in zip(users, answers, strict=True):
                words = user.split("<</SYS>>\n\n")[-1].split(":")[-1].rstrip("?").split()
                assert 3 <= len(words) <= 4 and answer == words[-1], (user, answer)
                tuples[name].add(tuple(words))
    assert not tuples["train.jsonl"] & tuples["valid.jsonl"]


def test_demo_dialogs_are_short(llama: Tokenizer) -> None:
    """Under 100 tokens each with the Llama 2 tokenizer (the demo's 8000-piece SOTU tokenizer
    gives 16-72); the answers are a tenth of the tokens or so."""
    lengths, targets = [], 0
    for line in (DEMO / "train.jsonl").read_text(encoding="utf-8").splitlines():
        ids, mask = encode_dialog(llama, record_messages(json.loads(line)))
        lengths.append(len(ids))
        targets += sum(mask)
    assert max(lengths) < 100 and len(lengths) == 2000
    assert 0.05 < targets / sum(lengths) < 0.3
