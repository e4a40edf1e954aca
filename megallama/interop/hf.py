"""Hugging Face LlamaForCausalLM checkpoints, read and written one tensor at a time.

Reading opens the safetensors file that holds a tensor, copies that tensor out and closes the file
again (so its memory map, and the page-cache pages it touched, leave the process). Writing plans
every shard's header from the config alone -- names, dtypes, shapes and byte offsets are all known
before the first tensor arrives -- and then appends each tensor's bytes as it is produced, so no
shard is ever assembled in memory. Tensors cross this module in Meta's layout; the q/k RoPE row
permutation is applied here (per head, with the KV-head count for k).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from megallama.checkpoint.atomic import CheckpointError, fsync_file
from megallama.config import ConfigError, ModelConfig
from megallama.data.hf_tokenizer import write_hf_tiktoken_tokenizer
from megallama.data.tokenizer import Tokenizer, TokenizerError
from megallama.interop.names import (
    hf_tensor_to_meta,
    meta_tensor_to_hf,
    meta_to_hf_name,
    model_tensor_shapes,
)

ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
ST_TO_TORCH = {v: k for k, v in ST_DTYPES.items()}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_IGNORED_HF = ("rotary_emb.inv_freq",)


def nbytes_of(shape: list[int], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of ``t`` without a copy when it is contiguous (any dtype)."""
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


class SafetensorsStream:
    """A safetensors file written front to back: the header from a plan, then each tensor's bytes
    in plan order. Peak memory is the tensor being written, whatever the file size."""

    def __init__(self, path: Path, plan: list[tuple[str, torch.dtype, list[int]]],
                 metadata: dict[str, str], *, sha256: bool = False) -> None:
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        for name, dtype, shape in plan:
            n = nbytes_of(shape, dtype)
            header[name] = {"dtype": ST_DTYPES[dtype], "shape": shape,
                            "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.path, self._plan, self._next = Path(path), plan, 0
        self._hash = hashlib.sha256() if sha256 else None
        self._f = open(self.path, "wb")  # noqa: SIM115 -- closed by close()
        self._put(struct.pack("<Q", len(raw)) + raw)

    def _put(self, data: bytes | memoryview) -> None:
        self._f.write(data)
        if self._hash is not None:
            self._hash.update(data)

    def write(self, name: str, t: torch.Tensor) -> None:
        if self._next >= len(self._plan):
            raise CheckpointError(f"{self.path}: {name}: more tensors than planned")
        want, dtype, shape = self._plan[self._next]
        if (name, t.dtype, list(t.shape)) != (want, dtype, shape):
            raise CheckpointError(f"{self.path}: got {name} {t.dtype} {list(t.shape)}, expected "
                                  f"{want} {dtype} {shape} next")
        self._put(tensor_bytes(t))
        self._next += 1

    def close(self) -> tuple[int, str | None]:
        """Flush and fsync; returns (size in bytes, sha256 hex or None)."""
        if self._next != len(self._plan):
            raise CheckpointError(f"{self.path}: {len(self._plan) - self._next} planned tensors "
                                  f"never written (next: {self._plan[self._next][0]})")
        self._f.close()
        fsync_file(self.path)
        return self.path.stat().st_size, None if self._hash is None else self._hash.hexdigest()

    def abort(self) -> None:
        self._f.close()


# ---- reader --------------------------------------------------------------------------------------
def check_rope_scaling(scaling: Any) -> None:
    """A config's ``rope_scaling`` must be null or an object whose ``factor``, when given, is a
    finite number (ModelConfig would keep a string, a list or NaN and fail or export it later)."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling={scaling!r}: expected an object or null")
    factor = scaling.get("factor", 1.0)
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not math.isfinite(factor):
        raise ConfigError(f"rope_scaling.factor={factor!r}: expected a finite number")


def read_hf_config(path: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, raw config.json) of an HF Llama checkpoint directory; one-line errors."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: not found (an HF checkpoint needs config.json)")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ConfigError(f"expected a JSON object, got {type(raw).__name__}")
        if raw.get("model_type") not in (None, "llama"):
            raise ConfigError(f"model_type {raw['model_type']!r} is not 'llama'")
        check_rope_scaling(raw.get("rope_scaling") or raw.get("rope_parameters") or None)
        inter = raw.get("intermediate_size", 1)  # solved into multiple_of/ffn_dim_multiplier
        if isinstance(inter, bool) or not isinstance(inter, int) or inter < 1:
            raise ConfigError(f"intermediate_size={inter!r}: expected an integer >= 1")
        return ModelConfig.from_hf_config(raw), raw
    except (json.JSONDecodeError, UnicodeDecodeError, ConfigError, KeyError, TypeError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{cfg_path}: {what}") from None


def _read_weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of ``model.safetensors.index.json``: tensor name -> a plain file name
    beside the index (never a path leading elsewhere); one-line errors naming the index."""
    try:
        wmap = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: malformed safetensors index ({e})") from None
    if not isinstance(wmap, dict):
        raise CheckpointError(f"{index}: malformed safetensors index (weight_map is a "
                              f"{type(wmap).__name__}, expected an object of tensor -> file)")
    for key, fname in wmap.items():
        if not isinstance(fname, str) or Path(fname).name != fname or fname in ("", ".", ".."):
            raise CheckpointError(f"{index}: {key}: file {fname!r} is not a file name beside the "
                                  "index")
    return wmap


class HFSource:
    """Streams (Meta name, full tensor in Meta layout, file) out of an HF checkpoint directory,
    after checking the key set and every shape against config.json (headers only)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.config, _ = read_hf_config(self.path)
        stored: dict[str, str] = {}
        self.files = self._weight_map()
        expected = {meta_to_hf_name(n): s for n, s in model_tensor_shapes(self.config)}
        self.names = list(expected)
        # a tied model's lm_head.weight, when a writer stored it, must be the embedding: checked,
        # not converted
        ignored = _IGNORED_HF + (("lm_head.weight",) if self.config.tie_embeddings else ())
        if self.config.tie_embeddings and "lm_head.weight" in self.files:
            self._check_tied_head(self.files["lm_head.weight"])
        self.files = {k: v for k, v in self.files.items() if not k.endswith(ignored)}
        for fname in sorted(set(self.files.values())):
            fpath = self.path / fname
            try:
                with safe_open(fpath, framework="pt") as f:
                    keys = [k for k in f.keys() if not k.endswith(ignored)]
                    for key in keys:
                        if key not in expected:
                            raise CheckpointError(f"{fpath}: {key}: unexpected tensor (not a "
                                                  "parameter of this config)")
                        if self.files.get(key) != fname:
                            raise CheckpointError(f"{fpath}: {key}: not listed for this file in "
                                                  f"{INDEX_FILE}")
                        view = f.get_slice(key)
                        shape, stored[key] = list(view.get_shape()), view.get_dtype()
                        if shape != expected[key]:
                            raise CheckpointError(f"{fpath}: {key}: shape {shape}, config.json "
                                                  f"implies {expected[key]}")
                        if stored[key] not in ST_TO_TORCH:
                            raise CheckpointError(f"{fpath}: {key}: dtype {stored[key]} is not "
                                                  "F32/BF16/F16 (not Llama weights)")
            except CheckpointError:
                raise
            except Exception as e:  # SafetensorError / OSError
                raise CheckpointError(f"{fpath}: not a readable safetensors file "
                                      f"({str(e).splitlines()[0]})") from None
        missing = [n for n in self.names if n not in stored]
        if missing:
            name = missing[0]
            where = (self.path / self.files[name] if name in self.files else
                     self.path / (INDEX_FILE if (self.path / INDEX_FILE).is_file() else SINGLE_FILE))
            raise CheckpointError(f"{where}: {name}: missing ({len(missing)} tensor(s) missing "
                                  "in all)")
        # the output default is what is stored (config.json's torch_dtype can disagree with it)
        first = stored[self.names[0]]
        if first not in ST_TO_TORCH:
            raise CheckpointError(f"{self.path / self.files[self.names[0]]}: {self.names[0]}: "
                                  f"dtype {first} is not F32/BF16/F16")
        self.declared_dtype = ST_TO_TORCH[first]
        self.nbytes = sum(nbytes_of(s, ST_TO_TORCH.get(stored[n], torch.float32))
                          for n, s in expected.items())

    def _check_tied_head(self, head_file: str) -> None:
        """config.json's tie_word_embeddings is true: a stored lm_head.weight must equal the
        embedding (or the head of an untied model would be dropped)."""
        tensors = []
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            fname = head_file if name == "lm_head.weight" else self.files.get(name, head_file)
            try:
                with safe_open(self.path / fname, framework="pt") as f:
                    tensors.append(f.get_tensor(name))
            except Exception:  # noqa: BLE001 -- a missing or unreadable one is reported below
                return
        if not torch.equal(*tensors):
            raise CheckpointError(f"{self.path / 'config.json'}: tie_word_embeddings=true but "
                                  f"lm_head.weight ({head_file}) differs from the embedding; set "
                                  "it false to convert an untied model")

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            wmap = _read_weight_map(index)
            for key, fname in wmap.items():
                if not (self.path / fname).is_file():
                    raise CheckpointError(f"{self.path / fname}: {key}: listed in {INDEX_FILE} "
                                          "but the file does not exist")
            return {k: v for k, v in wmap.items() if not k.endswith(_IGNORED_HF)}
        single = self.path / SINGLE_FILE
        if not single.is_file():
            raise CheckpointError(f"{self.path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
        try:
            with safe_open(single, framework="pt") as f:
                return {k: SINGLE_FILE for k in f.keys() if not k.endswith(_IGNORED_HF)}
        except Exception as e:  # SafetensorError (truncated, corrupt header) / OSError
            raise CheckpointError(f"{single}: not a readable safetensors file "
                                  f"({str(e).splitlines()[0]})") from None

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor, str]]:
        for hf_name in self.names:
            fpath = self.path / self.files[hf_name]
            with safe_open(fpath, framework="pt") as f:  # closed per tensor: unmaps its pages
                t = f.get_tensor(hf_name)
            name, t = hf_tensor_to_meta(hf_name, t, self.config)
            yield name, t.contiguous(), str(fpath)


# ---- writer --------------------------------------------------------------------------------------
class HFSink:
    """Writes LlamaForCausalLM safetensors shards of at most ``max_shard_size`` bytes (a tensor
    larger than that gets a shard of its own), the index when there is more than one shard,
    config.json, generation_config.json and, if given, tokenizer files."""

    def __init__(self, out: Path, cfg: ModelConfig, dtype: torch.dtype, max_shard_size: int,
                 tokenizer: Path | None = None) -> None:
        self.out, self.cfg, self.dtype = Path(out), cfg, dtype
        shards: list[list[tuple[str, torch.dtype, list[int]]]] = [[]]
        size = 0
        for name, shape in model_tensor_shapes(cfg):
            n = nbytes_of(shape, dtype)
            if shards[-1] and size + n > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append((meta_to_hf_name(name), dtype, shape))
            size += n
        count = len(shards)
        self.file_names = ([SINGLE_FILE] if count == 1 else
                           [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        self.shard_plans = shards
        self.where = {e[0]: i for i, plan in enumerate(shards) for e in plan}
        self.total = sum(nbytes_of(s, dtype) for _, s in model_tensor_shapes(cfg))
        self._open: tuple[int, SafetensorsStream] | None = None
        self.tokenizer = tokenizer

    def write(self, name: str, t: torch.Tensor) -> None:
        hf_name, t = meta_tensor_to_hf(name, t, self.cfg)
        shard = self.where[hf_name]
        if self._open is None or self._open[0] != shard:
            if self._open is not None:
                self._open[1].close()
            path = self.out / self.file_names[shard]
            self._open = (shard, SafetensorsStream(path, self.shard_plans[shard], {"format": "pt"}))
        self._open[1].write(hf_name, t)

    def finish(self) -> None:
        if self._open is not None:
            self._open[1].close()
        if len(self.file_names) > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {n: self.file_names[i] for n, i in self.where.items()}}
            (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        hf = self.cfg.to_hf_config(torch_dtype=HF_DTYPE_NAMES[self.dtype])
        (self.out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        bos, eos = self.cfg.bos_eos_ids()
        gen: dict[str, Any] = {"bos_token_id": bos, "eos_token_id": self._stop_ids() or eos}
        if self.cfg.pad_token_id is not None:
            gen["pad_token_id"] = self.cfg.pad_token_id
        (self.out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if self.tokenizer is not None:
            write_hf_tokenizer(self.tokenizer, self.out, self.cfg)

    def abort(self) -> None:
        if self._open is not None:
            self._open[1].abort()

    def _stop_ids(self) -> list[int] | None:
        """The shipped Llama 3 tokenizer's stop ids (<|end_of_text|>, <|eom_id|>, <|eot_id|>), so
        transformers' ``generate`` stops where megallama's does; None otherwise (one EOS)."""
        src = None if self.tokenizer is None else Path(self.tokenizer)
        if src is None or src.is_dir() or not src.is_file():
            return None
        tok = Tokenizer(src)
        return list(tok.stop_ids) if tok.chat_format == "llama3" else None


HF_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json")


def write_hf_tokenizer(src: Path, out: Path, cfg: ModelConfig) -> None:
    """Copy HF tokenizer files from a directory, or wrap a sentencepiece ``tokenizer.model`` with
    the tokenizer_config.json / special_tokens_map.json that LlamaTokenizer expects, or beside a
    tiktoken ``tokenizer.model`` (Llama 3) write tokenizer.json + tokenizer_config.json
    (:mod:`megallama.data.hf_tokenizer`)."""
    src = Path(src)
    if src.is_dir():
        found = [n for n in HF_TOKENIZER_FILES if (src / n).is_file()]
        if not found:
            raise CheckpointError(f"{src}: no tokenizer files ({', '.join(HF_TOKENIZER_FILES)})")
        for n in found:
            shutil.copyfile(src / n, out / n)
        return
    if not src.is_file():
        raise CheckpointError(f"{src}: tokenizer not found")
    shutil.copyfile(src, out / "tokenizer.model")
    if Tokenizer(src).chat_format == "llama3":  # tiktoken: tokenizer.json for AutoTokenizer
        try:
            write_hf_tiktoken_tokenizer(src, out, cfg.max_seq_len)
        except TokenizerError as e:
            raise CheckpointError(f"{src}: {e}") from None
        return
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {"tokenizer_class": "LlamaTokenizer", **special, "add_bos_token": True,
              "add_eos_token": False, "model_max_length": cfg.max_seq_len, "legacy": False,
              "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
