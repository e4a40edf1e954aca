"""The Llama 3 chat format (3, 3.1, 3.2, 3.3): a checked dialog -> token ids and the loss mask.

The ids are exactly those of Meta's reference ``ChatFormat`` (``llama_models.llama3.chat_format``,
``encode_dialog_prompt`` / ``encode_message``) for text messages::

    <|begin_of_text|>
    <|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>        (optional)
    <|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{answer}<|eot_id|>
    ...

one BOS for the whole dialog, the system prompt as a message of its own, each role name and the
``\\n\\n`` after its header encoded as text, each content encoded as it is (Meta's code does not
strip it; the chat template of Meta's HF tokenizer does). A prompt for generation ends with the
header of the assistant's turn, ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``; the model
answers and ends its turn with ``<|eot_id|>`` (a stop id of the tokenizer).

The loss mask is True on each answer's content tokens and its ``<|eot_id|>``, so the model learns
to end its turn; BOS, headers, system and user messages are context only. Special tokens are
placed by id; the text of one inside a message encodes as plain text (Meta's ``encode``), so
:mod:`megallama.data.chat` refuses it unless tags are allowed (:func:`find_special_token`).
"""

from __future__ import annotations

import re

from megallama.data.tiktoken_bpe import ALL_SPECIAL_TOKENS
from megallama.data.tokenizer import Tokenizer

_SPECIAL = frozenset(ALL_SPECIAL_TOKENS)
_SPECIAL_LIKE = re.compile(r"<\|[a-z0-9_]{1,40}\|>")


def find_special_token(text: str) -> str | None:
    """The first special token's text (``<|eot_id|>``, ...) in ``text``; None when none is."""
    for match in _SPECIAL_LIKE.finditer(text):
        if match.group() in _SPECIAL:
            return match.group()
    return None


def encode_header(tokenizer: Tokenizer, role: str) -> list[int]:
    """``<|start_header_id|>{role}<|end_header_id|>\\n\\n`` (Meta's ``_encode_header``)."""
    special = tokenizer.special_tokens
    return [special["<|start_header_id|>"], *tokenizer.encode(role, bos=False),
            special["<|end_header_id|>"], *tokenizer.encode("\n\n", bos=False)]


def encode_message(tokenizer: Tokenizer, role: str, content: str) -> tuple[list[int], list[bool]]:
    """One message, header to ``<|eot_id|>`` (Meta's ``encode_message``), and its loss mask:
    True on an assistant's content and ``<|eot_id|>``, False everywhere else."""
    header = encode_header(tokenizer, role)
    body = [*tokenizer.encode(content, bos=False), tokenizer.special_tokens["<|eot_id|>"]]
    return header + body, [False] * len(header) + [role == "assistant"] * len(body)


def _encode(tokenizer: Tokenizer, system: str | None, turns: list[tuple[str, str]],
            ) -> tuple[list[int], list[bool]]:
    messages = ([("system", system)] if system is not None else []) + turns
    ids, mask = [tokenizer.bos_id], [False]
    for role, content in messages:
        message, message_mask = encode_message(tokenizer, role, content)
        ids += message
        mask += message_mask
    return ids, mask


def encode_dialog(tokenizer: Tokenizer, system: str | None, turns: list[tuple[str, str]],
                  ) -> tuple[list[int], list[bool]]:
    """Ids and loss mask of a checked training dialog (``turns`` end with the assistant's)."""
    return _encode(tokenizer, system, turns)


def encode_dialog_prompt(tokenizer: Tokenizer, system: str | None,
                         turns: list[tuple[str, str]]) -> list[int]:
    """Ids of a checked dialog ending with a user turn, then the assistant's header (Meta's
    ``encode_dialog_prompt``): the model's answer follows."""
    return _encode(tokenizer, system, turns)[0] + encode_header(tokenizer, "assistant")
