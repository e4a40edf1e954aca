"""HF tokenizer files for Llama 3's tiktoken tokenizer: ``tokenizer.json`` + ``tokenizer_config.json``
that transformers' ``AutoTokenizer`` loads as a fast tokenizer giving tiktoken's ids.

``tokenizer.json`` comes from transformers' ``TikTokenConverter`` (the tiktoken ranks as a
byte-level BPE with their merges, Meta's split pattern, the 256 special tokens at 128000..128255)
plus, as in Meta's HF release, a post-processor that puts ``<|begin_of_text|>`` first, so
``tokenizer(text).input_ids == Tokenizer.encode(text, bos=True)``. ``tokenizer_config.json``
names ``PreTrainedTokenizerFast`` (transformers 4 and 5 load it), BOS/EOS, the model's context,
``clean_up_tokenization_spaces: false`` (decoding equals tiktoken's; Meta's release sets true,
which drops the space before punctuation) and a chat template that renders
:mod:`megallama.data.chat_llama3`'s format (contents not stripped, as in Meta's ``ChatFormat``).
transformers is needed only here (``megallama[eval]`` or ``[test]`` install it).
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

from megallama.data.tiktoken_bpe import ALL_SPECIAL_TOKENS, PAT_STR
from megallama.data.tokenizer import Tokenizer, TokenizerError

LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content']"
    " + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
HF_TIKTOKEN_FILES = ("tokenizer.json", "tokenizer_config.json")


def write_hf_tiktoken_tokenizer(src: str | Path, out: str | Path, model_max_length: int,
                                ) -> list[Path]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` for the tiktoken BPE file ``src``
    (Llama 3's ``tokenizer.model``) into the directory ``out``; return their paths. Each file
    is written beside its name and renamed into place. Raises TokenizerError for a file that
    is not a tiktoken tokenizer, or when transformers is not installed."""
    tokenizer = Tokenizer(src)
    if tokenizer.chat_format != "llama3":
        raise TokenizerError(f"{src} is not a tiktoken BPE file (Llama 3's tokenizer.model); a "
                             "SentencePiece model is exported as tokenizer.model itself")
    backend = _converted(Path(src), tokenizer)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": int(model_max_length),
        "clean_up_tokenization_spaces": False,
        "chat_template": LLAMA3_CHAT_TEMPLATE,
    }
    out = Path(out)
    paths = [out / name for name in HF_TIKTOKEN_FILES]
    texts = [backend.to_str(pretty=True), json.dumps(config, indent=2, ensure_ascii=False)]
    for path, text in zip(paths, texts, strict=True):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, path)
    return paths


def _converted(src: Path, tokenizer: Tokenizer):  # -> tokenizers.Tokenizer
    """transformers' TikTokenConverter output with Meta's BOS post-processor."""
    try:
        from tokenizers import processors
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError as exc:
        raise TokenizerError(f"writing HF tokenizer files for {src} needs transformers ({exc}): "
                             "pip install 'megallama[eval]'") from None
    # transformers 5 names the argument extra_special_tokens, 4.x additional_special_tokens
    params = inspect.signature(TikTokenConverter.__init__).parameters
    key = "extra_special_tokens" if "extra_special_tokens" in params else "additional_special_tokens"
    backend = TikTokenConverter(vocab_file=str(src), pattern=PAT_STR,
                                **{key: list(ALL_SPECIAL_TOKENS)}).converted()
    if backend.get_vocab_size(with_added_tokens=True) != tokenizer.vocab_size:
        raise TokenizerError(f"{src}: transformers' converter gave "
                             f"{backend.get_vocab_size(with_added_tokens=True)} ids, not the "
                             f"tokenizer's {tokenizer.vocab_size}")
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, tokenizer.bos_id)]),
    ])
    return backend


__all__ = ["HF_TIKTOKEN_FILES", "LLAMA3_CHAT_TEMPLATE", "write_hf_tiktoken_tokenizer"]
