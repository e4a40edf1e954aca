"""The Llama 2 and Llama 3 chat formats: dialogs -> token ids and the loss mask, one definition for
training (preprocessing of chat data) and inference (``megallama-generate --chat``). The
tokenizer chooses the format (its ``chat_format``): Llama 3's for its tiktoken tokenizer (see
:mod:`megallama.data.chat_llama3`), Llama 2's below for a SentencePiece one.

The Llama 2 ids are exactly those of Meta's reference ``chat_completion`` (llama/generation.py of
meta-llama/llama), so a model fine-tuned here sees at training what it sees at inference:

- a system prompt (optional, first message only) is wrapped as
  ``"<<SYS>>\\n" + system + "\\n<</SYS>>\\n\\n"`` and prepended to the first user content. As in
  Meta's code the system text itself is not stripped: ``strip()`` applies to the whole combined
  user content, so the user's leading whitespace after the block stays;
- each user/assistant pair is the one string ``f"[INST] {user.strip()} [/INST] {answer.strip()} "``
  encoded with BOS and EOS, the pairs concatenated;
- a prompt for generation ends with ``f"[INST] {user.strip()} [/INST]"`` encoded with BOS and
  without EOS.

The loss mask (:func:`encode_dialog`) is True exactly on the tokens of each pair after those of
``"[INST] {user} [/INST]"`` encoded with BOS: the answer's tokens (with the trailing space's piece)
and the EOS. Those prompt tokens must be a prefix of the pair's tokens; a tokenizer that merged
a piece across the end of ``[/INST]`` would make the split ambiguous, and raises.

Like Meta's ``chat_completion``, which refuses a dialog whose messages contain one of the format's
tags (``[INST]``, ``[/INST]``, ``<<SYS>>``, ``<</SYS>>``), both encoders raise
:class:`ChatTagError` for such text: as plain text it would read as markup, a second turn or
system block the model never got, and train or prompt the model on it without a word.
``allow_tags=True`` (``--allow-chat-tags`` of preprocessing and ``generate --chat``) keeps the
text as it is, for data that needs the strings (e.g. text about the format itself).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from megallama.data import chat_llama3 as llama3
from megallama.data.tokenizer import Tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
CHAT_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")  # Meta's SPECIAL_TAGS
ROLES = ("system", "user", "assistant")
CHAT_KEYS = ("messages", "prompt", "response")  # the JSONL fields that make a record a dialog


class ChatFormatError(ValueError):
    """A dialog that is not in the form the chat format needs (roles, order, types, empty
    answers), or a tokenizer that cannot split a pair into prompt and answer."""


class ChatTagError(ChatFormatError):
    """A message whose text contains one of the chat format's own tags (:data:`CHAT_TAGS`)."""


def find_chat_tag(text: str, chat_format: str = "llama2") -> str | None:
    """The first of the chat format's tags that occurs in ``text``, by position; None when there
    is none. Llama 2's are :data:`CHAT_TAGS`, Llama 3's its special tokens' texts."""
    if chat_format == "llama3":
        return llama3.find_special_token(text)
    found = [(text.find(tag), tag) for tag in CHAT_TAGS if tag in text]
    return min(found)[1] if found else None


def chat_tag_problem(tag: str, chat_format: str = "llama2") -> str:
    """Why a message may not hold ``tag`` (the words after "contains '<tag>', ")."""
    if chat_format == "llama3":
        return ("a special token of the Llama 3 chat format, which a message would hold as plain "
                "text, not as the control token")
    return "a tag of the Llama 2 chat format that Meta's chat_completion refuses in a message"


def check_chat_tags(messages: object, chat_format: str = "llama2") -> None:
    """Raise ChatTagError naming the first message whose content holds a chat tag, as Meta's
    ``chat_completion`` refuses such a dialog (every role: system, user and assistant)."""
    for n, (role, content) in enumerate(_messages(messages), 1):
        tag = find_chat_tag(content, chat_format)
        if tag is not None:
            raise ChatTagError(
                f"message {n} ({role}) contains {tag!r}, {chat_tag_problem(tag, chat_format)}; "
                "remove it, or keep it as text with --allow-chat-tags")


def json_type(value: object) -> str:
    """How JSON names the type of a parsed value, with its article: "a JSON number", ..."""
    names = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object",
             str: "string"}
    if value is None:
        return "a JSON null"
    return f"a JSON {names.get(type(value), type(value).__name__)}"


def _messages(messages: object) -> list[tuple[str, str]]:
    """``(role, content)`` of every message, after checking each one's shape and types."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise ChatFormatError("'messages' must be a list of {\"role\", \"content\"} objects, "
                              f"got {json_type(messages)}")
    if not messages:
        raise ChatFormatError("'messages' is empty: a dialog needs a user and an assistant turn")
    checked = []
    for n, message in enumerate(messages, 1):
        if not isinstance(message, Mapping):
            raise ChatFormatError(f"message {n} is {json_type(message)}, not an object with "
                                  "'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ChatFormatError(f"message {n}: unknown role {role!r}; roles are 'system', "
                                  "'user' and 'assistant'")
        if not isinstance(content, str):
            what = "none" if "content" not in message else json_type(content)
            raise ChatFormatError(f"message {n} ({role}): 'content' must be a string, got "
                                  f"{what}")
        checked.append((role, content))
    return checked


def split_dialog(messages: object, last: Literal["user", "assistant"] = "assistant",
                 ) -> tuple[list[str], list[str]]:
    """Check a dialog and return ``(user contents, answers)``, the system prompt already folded
    into the first user content as Meta's Llama 2 code does. A dialog is an optional system
    message first, then user and assistant turns alternating, ending with a ``last`` turn;
    answers are non-blank. Raises ChatFormatError naming the first message that breaks this."""
    system, turns = check_dialog(messages, last)
    users = [content for role, content in turns if role == "user"]
    answers = [content for role, content in turns if role == "assistant"]
    if system is not None:
        users[0] = f"{B_SYS}{system}{E_SYS}{users[0]}"
    return users, answers


def check_dialog(messages: object, last: Literal["user", "assistant"] = "assistant",
                 ) -> tuple[str | None, list[tuple[str, str]]]:
    """``(system prompt or None, [(role, content) of the user and assistant turns]``) of a
    dialog in the form :func:`split_dialog` describes; ChatFormatError otherwise."""
    checked = _messages(messages)
    system = checked[0][1] if checked[0][0] == "system" else None
    turns = checked[1:] if system is not None else checked
    first = 2 if system is not None else 1  # message number of turns[0]
    for i, (role, content) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            if role == "system":
                detail = "a system message is allowed only as the first message"
            else:
                after = "at the start" if i == 0 else f"after a {turns[i - 1][0]!r} turn"
                detail = f"expected {expected!r} {after}, got {role!r}"
            raise ChatFormatError(f"message {first + i}: {detail} (a dialog alternates user and "
                                  "assistant turns, starting with user)")
        if role == "assistant" and not content.strip():
            raise ChatFormatError(f"message {first + i}: empty assistant turn (nothing to train "
                                  "on); drop the turn or the record")
    if not turns:
        raise ChatFormatError("the dialog has only a system message: it needs a user turn")
    if turns[-1][0] != last:  # then it is the other role: turns alternate
        where = f"(message {first + len(turns) - 1})"
        if last == "assistant":
            ended = f"a 'user' turn {where}; a training dialog must end with an 'assistant' turn"
        else:
            ended = f"an 'assistant' turn {where}; a prompt must end with a 'user' turn"
        raise ChatFormatError(f"the dialog ends with {ended}")
    return system, turns


def _prompt_ids(tokenizer: Tokenizer, user: str) -> list[int]:
    return tokenizer.encode(f"{B_INST} {user.strip()} {E_INST}", bos=True, eos=False)


def encode_dialog(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], *,
                  allow_tags: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of a training dialog (ending with an assistant turn) and its loss mask: True on
    each answer's tokens and the EOS, False on BOS, system prompt, ``[INST]``, the user's text
    and ``[/INST]``. Raises ChatFormatError for a malformed dialog (see :func:`split_dialog`),
    ChatTagError for a chat tag in a message unless ``allow_tags``. A Llama 3 tokenizer gets
    Llama 3's format (:func:`megallama.data.chat_llama3.encode_dialog`)."""
    if _format(tokenizer) == "llama3":
        system, turns = check_dialog(messages, last="assistant")
        if not allow_tags:
            check_chat_tags(messages, "llama3")
        return llama3.encode_dialog(tokenizer, system, turns)
    users, answers = split_dialog(messages, last="assistant")
    if not allow_tags:
        check_chat_tags(messages)
    ids: list[int] = []
    mask: list[bool] = []
    for n, (user, answer) in enumerate(zip(users, answers, strict=True), 1):
        pair = tokenizer.encode(f"{B_INST} {user.strip()} {E_INST} {answer.strip()} ",
                                bos=True, eos=True)
        prompt = _prompt_ids(tokenizer, user)
        if pair[: len(prompt)] != prompt or len(pair) <= len(prompt):
            raise ChatFormatError(
                f"turn {n}: tokenizer {tokenizer.path} merges the end of '{E_INST}' with the "
                "answer, so the prompt tokens are not a prefix of the pair's tokens and the loss "
                "mask cannot be placed; use a Llama-style tokenizer (split on whitespace)")
        ids += pair
        mask += [False] * len(prompt) + [True] * (len(pair) - len(prompt))
    return ids, mask


def encode_dialog_prompt(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], *,
                         allow_tags: bool = False) -> list[int]:
    """Token ids of a dialog that ends with a user turn, for generation: the finished pairs as
    :func:`encode_dialog` gives them, then ``[INST] {user} [/INST]`` with BOS and no EOS; the
    model's answer follows. Raises ChatFormatError for a malformed dialog, ChatTagError for a
    chat tag in a message unless ``allow_tags``. A Llama 3 tokenizer gets Llama 3's format
    (:func:`megallama.data.chat_llama3.encode_dialog_prompt`)."""
    if _format(tokenizer) == "llama3":
        system, turns = check_dialog(messages, last="user")
        if not allow_tags:
            check_chat_tags(messages, "llama3")
        return llama3.encode_dialog_prompt(tokenizer, system, turns)
    users, answers = split_dialog(messages, last="user")
    if not allow_tags:
        check_chat_tags(messages)
    ids: list[int] = []
    for user, answer in zip(users, answers, strict=False):
        ids += tokenizer.encode(f"{B_INST} {user.strip()} {E_INST} {answer.strip()} ",
                                bos=True, eos=True)
    return ids + _prompt_ids(tokenizer, users[-1])


def _format(tokenizer: Tokenizer) -> str:
    """The tokenizer's chat format; Llama 2's for a tokenizer that names none."""
    return getattr(tokenizer, "chat_format", "llama2") or "llama2"


def record_messages(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The messages of a chat JSONL record: ``{"messages": [...]}`` as is, or the short form
    ``{"prompt": ..., "response": ...}`` (optional ``"system"``) as a system/user/assistant
    dialog. Raises ChatFormatError for a record that mixes or half-fills the two forms."""
    if "messages" in record:
        extra = [k for k in ("prompt", "response", "system") if k in record]
        if extra:
            raise ChatFormatError(f"the record has both 'messages' and {extra[0]!r}: give either "
                                  "'messages' or the short form 'prompt'/'response'")
        return record["messages"]
    if "prompt" not in record:
        raise ChatFormatError("'response' without 'prompt': the short form needs both")
    if "response" not in record:
        raise ChatFormatError("'prompt' without 'response': the short form needs both "
                              "(a dialog must end with an assistant turn)")
    for key in ("system", "prompt", "response"):
        if key in record and not isinstance(record[key], str):
            raise ChatFormatError(f"{key!r} must be a string, got {json_type(record[key])}")
    system = [{"role": "system", "content": record["system"]}] if "system" in record else []
    return [*system, {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]}]
