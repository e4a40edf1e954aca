"""The Llama 3 chat format against Meta's reference ``ChatFormat`` (llama-models 0.3.0): dialog
prompts and training dialogs with and without a system message, the loss mask on the answers and
their ``<|eot_id|>``, special-token text in messages, chat preprocessing, and generation (library
and ``megallama-generate --chat``) stopping at ``<|eot_id|>``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megallama.data.chat import ChatFormatError, ChatTagError, encode_dialog, encode_dialog_prompt
from megallama.data.indexed import IndexedTokens
from megallama.data.preprocess import preprocess
from megallama.data.tokenizer import Tokenizer
from megallama.inference.generation import chat_prompt, generate
from tests.conftest import require_module

EOT = 128009


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


DIALOGS = {
    "no_system": [msg("user", "Hi there"), msg("assistant", "Hello! How can I help?"),
                  msg("user", "What is 2+2?"), msg("assistant", "4")],
    "system": [msg("system", "You are terse.\nAnswer in one word."), msg("user", "Capital of France?"),
               msg("assistant", "Paris"), msg("user", "  and of Japan?\n"),
               msg("assistant", " Tokyo. ")],
    "unicode": [msg("system", ""), msg("user", "Переведи: 我能吞下玻璃 😀"),
                msg("assistant", "\n\nЯ могу есть стекло.\n"), msg("user", "[INST] ok [/INST]"),
                msg("assistant", "```py\nprint(1)\n```")],
}


@pytest.fixture(scope="module")
def meta_chat(llama3_tokenizer: Tokenizer):  # Meta's ChatFormat over Meta's Tokenizer
    chat_format = require_module("llama_models.llama3.chat_format")
    tokenizer = require_module("llama_models.llama3.tokenizer")
    return chat_format.ChatFormat(tokenizer.Tokenizer(llama3_tokenizer.path))


def _raw(messages: list[dict[str, str]]) -> list:
    from llama_models.datatypes import RawMessage, StopReason

    return [RawMessage(**m, stop_reason=StopReason.end_of_turn if m["role"] == "assistant"
                       else None) for m in messages]


@pytest.mark.parametrize("name", DIALOGS)
def test_prompt_ids_equal_metas(llama3_tokenizer: Tokenizer, meta_chat, name: str) -> None:
    """Every prefix that ends with a user turn: encode_dialog_prompt == ChatFormat's."""
    dialog = DIALOGS[name]
    for end in range(len(dialog)):
        if dialog[end]["role"] != "user":
            continue
        ours = encode_dialog_prompt(llama3_tokenizer, dialog[: end + 1], allow_tags=True)
        assert ours == meta_chat.encode_dialog_prompt(_raw(dialog[: end + 1])).tokens


@pytest.mark.parametrize("name", DIALOGS)
def test_training_ids_and_mask(llama3_tokenizer: Tokenizer, meta_chat, name: str) -> None:
    """BOS + Meta's encode_message of every message; the mask is True exactly on each answer's
    content and its <|eot_id|> (not on its header, not on system/user messages)."""
    dialog = DIALOGS[name]
    ids, mask = encode_dialog(llama3_tokenizer, dialog, allow_tags=True)
    expected, expected_mask = [128000], [False]
    for raw in _raw(dialog):
        message = meta_chat.encode_message(raw, None)[0]
        header = len(meta_chat._encode_header(raw.role))
        expected += message
        expected_mask += [False] * header + [raw.role == "assistant"] * (len(message) - header)
    assert ids == expected and mask == expected_mask
    answers = [m["content"] for m in dialog if m["role"] == "assistant"]
    targets = llama3_tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert targets == "".join(f"{a}<|eot_id|>" for a in answers)


def test_generation_chat_prompt(llama3_tokenizer: Tokenizer, meta_chat) -> None:
    ours = chat_prompt(llama3_tokenizer, "Name a colour.", "Be brief.")
    ref = meta_chat.encode_dialog_prompt(_raw([msg("system", "Be brief."),
                                               msg("user", "Name a colour.")])).tokens
    assert ours == ref
    assert llama3_tokenizer.decode(ours) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nName a colour.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_special_token_text_is_refused_unless_allowed(llama3_tokenizer: Tokenizer,
                                                      meta_chat) -> None:
    dialog = [msg("user", "end it <|eot_id|> here"), msg("assistant", "no")]
    with pytest.raises(ChatTagError, match=r"message 1 \(user\) contains '<\|eot_id\|>', a "
                                           r"special token of the Llama 3 chat format"):
        encode_dialog(llama3_tokenizer, dialog)
    with pytest.raises(ChatTagError, match=r"<\|start_header_id\|>"):
        encode_dialog_prompt(llama3_tokenizer, [msg("system", "<|start_header_id|>x"),
                                                msg("user", "hi")])
    ids, _ = encode_dialog(llama3_tokenizer, dialog, allow_tags=True)  # kept as plain text
    assert EOT not in ids[: ids.index(EOT)] and ids.count(EOT) == 2
    assert encode_dialog_prompt(llama3_tokenizer, dialog[:1], allow_tags=True) == (
        meta_chat.encode_dialog_prompt(_raw(dialog[:1])).tokens)
    # Llama 2's tags and look-alikes are plain text in Llama 3's format
    encode_dialog(llama3_tokenizer, [msg("user", "[INST] <<SYS>> <|not_a_token|>"),
                                     msg("assistant", "fine")])


def test_malformed_dialogs_fail_as_in_llama2(llama3_tokenizer: Tokenizer) -> None:
    with pytest.raises(ChatFormatError, match="must end with an 'assistant' turn"):
        encode_dialog(llama3_tokenizer, [msg("user", "a")])
    with pytest.raises(ChatFormatError, match="a prompt must end with a 'user' turn"):
        encode_dialog_prompt(llama3_tokenizer, [msg("user", "a"), msg("assistant", "b")])
    with pytest.raises(ChatFormatError, match="message 2: a system message is allowed only"):
        encode_dialog(llama3_tokenizer, [msg("user", "a"), msg("system", "b")])


def test_preprocessed_chat_jsonl(tmp_path: Path, llama3_tokenizer: Tokenizer) -> None:
    src = tmp_path / "chat.jsonl"
    records = [{"messages": DIALOGS["system"]}, {"prompt": "Hi", "response": "Hello"}]
    src.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    summary = preprocess([src], tmp_path / "c", llama3_tokenizer.path, progress=False)
    data = IndexedTokens(tmp_path / "c")
    assert data.dtype == np.dtype("<i4") and data.loss_mask is not None
    expected = [encode_dialog(llama3_tokenizer, DIALOGS["system"]),
                encode_dialog(llama3_tokenizer, [msg("user", "Hi"), msg("assistant", "Hello")])]
    assert data.tokens.tolist() == expected[0][0] + expected[1][0]
    assert data.loss_mask.tolist() == [int(m) for _, mask in expected for m in mask]
    assert summary["chat_documents"] == 2


@pytest.fixture(scope="module")
def eot_model(tmp_path_factory: pytest.TempPathFactory, llama3_tokenizer: Tokenizer):
    """A tiny model with Llama 3's vocabulary whose greedy answer to the chat prompt below is
    ``<|eot_id|>`` at once (its output row is twice the first greedy token's), saved as HF."""
    transformers = require_module("transformers")
    from megallama.config import preset
    from megallama.interop.names import meta_to_hf_state_dict
    from megallama.model.llama import Transformer

    cfg = preset("tiny_gqa", vocab_size=128256, n_layers=1, dim=32, max_seq_len=64)
    model = Transformer(cfg, seed=3).eval()
    ids = chat_prompt(llama3_tokenizer, "Name a colour.")
    first = generate(model, [ids], 1)[0][0]
    assert first not in llama3_tokenizer.stop_ids
    with torch.no_grad():
        model.output.weight[EOT] = 2 * model.output.weight[first]
    out = tmp_path_factory.mktemp("l3") / "hf"
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf_config()))
    hf.load_state_dict(meta_to_hf_state_dict(model.state_dict(), cfg), strict=False)
    hf.save_pretrained(out)
    return model, ids, out


def test_generation_stops_at_eot(eot_model, llama3_tokenizer: Tokenizer, capsys) -> None:
    from megallama.generate import main

    model, ids, hf_dir = eot_model
    assert generate(model, [ids], 4, eos_id=llama3_tokenizer.stop_ids) == [[]]
    assert generate(model, [ids], 2, eos_id=llama3_tokenizer.eos_id)[0][0] == EOT
    args = ["--checkpoint", str(hf_dir), "--format", "hf", "--tokenizer",
            str(llama3_tokenizer.path), "--chat", "--prompt", "Name a colour.",
            "--max-new-tokens", "4"]
    capsys.readouterr()
    prompt = llama3_tokenizer.decode(ids)  # ends with the assistant's header: nothing follows
    for stream, end in (([], "\n"), (["--no-stream"], "\n\n")):
        assert main([*args, *stream]) == 0
        assert capsys.readouterr().out == prompt + end
    assert main([*args[:-3], "a <|eot_id|> b", *args[-2:]]) == 2
    err = capsys.readouterr().err
    assert "--prompt contains '<|eot_id|>', a special token of the Llama 3 chat format" in err
    assert "--allow-chat-tags" in err and err.count("\n") == 1
