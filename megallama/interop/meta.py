"""Meta's consolidated checkpoints (``consolidated.NN.pth`` + ``params.json``), streamed.

The K files are fairscale model-parallel shards: every file holds every tensor's K-th slice along
the dimension fairscale splits it (see :func:`megallama.interop.names.meta_split_dim`; the
embedding is split along the hidden dimension), norms whole, plus ``rope.freqs``.

Reading maps all K files with ``torch.load(mmap=True, weights_only=True)`` -- weights_only refuses a
pickle that would run code -- concatenates one tensor's slices into fresh memory and then drops the
mapped pages it touched (``madvise(MADV_DONTNEED)``; they are clean private file pages, so this only
evicts them from the process), so resident memory stays near one tensor instead of growing to the
file size. Writing uses torch's own zip writer record by record: the pickle describing every tensor
is built from the config first (placeholder objects that pickle exactly as torch.save pickles a
tensor), then each incoming tensor's K slices are appended to the K files as they arrive. The
output loads with plain ``torch.load`` (mmap or not) and has the layout torch.save produces. The
torch-file mechanics (mapped loading and its checks, page release, the streaming zip writer) live
in :mod:`megallama.interop.torch_files`; this module knows Meta's layout.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megallama.checkpoint.atomic import CheckpointError
from megallama.config import ConfigError, ModelConfig
from megallama.interop.hf import check_rope_scaling
from megallama.interop.names import meta_split_dim, model_tensor_shapes
from megallama.interop.torch_files import (
    STORAGE_TYPES,
    TorchZipStream,
    load_mmap,
    release_pages,
)

ROPE_FREQS = "rope.freqs"
_FILE_RE = re.compile(r"consolidated\.(\d+)\.pth")
# Meta's published model-parallel sizes, by model width: 7B/8B 1, 13B 2, 70B 8, 405B 8.
_DEFAULT_MP = {4096: 1, 5120: 2, 8192: 8, 16384: 8}
# Meta's Llama 3 code loads a checkpoint strictly and has no rope.freqs buffer: no rope.freqs is
# written for its models, those of the tiktoken vocabulary or its rope_theta.
LLAMA3_VOCAB, LLAMA3_THETA = 128256, 500000.0


def default_mp(cfg: ModelConfig) -> int:
    """Meta's model-parallel size for this model width (1 for sizes Meta never published)."""
    return _DEFAULT_MP.get(cfg.dim, 1)


def check_mp(cfg: ModelConfig, mp: int, where: Path | str) -> None:
    """K shards must divide the query heads, the KV heads and every split width."""
    if mp < 1 or cfg.n_heads % mp or cfg.n_kv_heads % mp:
        raise CheckpointError(f"{where}: {mp} model-parallel shards do not divide n_heads="
                              f"{cfg.n_heads} and n_kv_heads={cfg.n_kv_heads}")
    for name, shape in model_tensor_shapes(cfg):
        dim = meta_split_dim(name)
        if dim is not None and shape[dim] % mp:
            raise CheckpointError(f"{where}: {name}: dim {dim} of {shape} is not divisible by "
                                  f"{mp} model-parallel shards")


def rope_freqs(cfg: ModelConfig, dtype: torch.dtype) -> torch.Tensor:
    """Meta's ``rope.freqs`` buffer: 1 / theta^(2i / head_dim), i < head_dim / 2."""
    hd = cfg.head_dim
    return (1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))).to(dtype)


def check_weight_dtype(path: Path, name: str, dtype: torch.dtype, first: torch.dtype) -> None:
    """A weight slice must be float32, bfloat16 or float16 (what every reader and writer handles;
    an integer or float64 tensor is not Llama weights) and of the dtype its first slice has."""
    def show(d: torch.dtype) -> str:
        return str(d).removeprefix("torch.")

    if dtype not in STORAGE_TYPES:
        raise CheckpointError(f"{path}: {name}: dtype {show(dtype)} is not "
                              "float32/bfloat16/float16 (not Llama weights)")
    if dtype != first:
        raise CheckpointError(f"{path}: {name}: dtype {show(dtype)}, while the earlier shards "
                              f"store it as {show(first)}")


# ---- reader --------------------------------------------------------------------------------------
class MetaSource:
    """Streams (name, full tensor, file) out of a consolidated checkpoint after validating
    params.json, the shard count, the key sets and every slice shape."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        params_path = self.path / "params.json"
        if not params_path.is_file():
            raise CheckpointError(f"{params_path}: not found (Meta checkpoints ship one)")
        found = sorted((int(m.group(1)), p) for p in self.path.iterdir()
                       if (m := _FILE_RE.fullmatch(p.name)))
        if not found:
            raise CheckpointError(f"{self.path}: no consolidated.NN.pth files")
        if [i for i, _ in found] != list(range(len(found))):
            raise CheckpointError(f"{self.path}: shard numbers {[i for i, _ in found]} are not "
                                  f"00..{len(found) - 1:02d}: a shard is missing")
        self.files = [p for _, p in found]
        self.mp = len(self.files)
        self.shards = [load_mmap(p) for p in self.files]
        try:
            params = json.loads(params_path.read_text(encoding="utf-8"))
            if not isinstance(params, dict):
                raise ConfigError(f"expected a JSON object, got {type(params).__name__}")
            check_rope_scaling(params.get("rope_scaling"))
            self.config = ModelConfig.from_meta_params(params, vocab_size=self._vocab(params))
        except (json.JSONDecodeError, UnicodeDecodeError, ConfigError, TypeError) as e:
            raise CheckpointError(f"{params_path}: {e}") from None
        check_mp(self.config, self.mp, self.files[0])
        self.expected = model_tensor_shapes(self.config)
        self.names = [n for n, _ in self.expected]
        # tied (tie_word_embeddings in params.json): Meta's code still loads an output.weight,
        # which must then be the embedding; it is checked, not converted
        self.extra = {"output.weight"} if self.config.tie_embeddings else set()
        self._validate()
        first = self.shards[0]["tok_embeddings.weight"].dtype
        self.declared_dtype = first
        self.nbytes = sum(first.itemsize * torch.Size(s).numel() for _, s in self.expected)

    def _vocab(self, params: dict[str, Any]) -> Any:
        """params.json's vocab_size, or for Meta's -1 (or none) the embedding's row count: the
        tokenizer's size. A value of the wrong type is returned as is for ModelConfig to refuse."""
        vocab = params.get("vocab_size", -1)
        if vocab is not None and (isinstance(vocab, bool) or not isinstance(vocab, int)
                                  or vocab > 0):
            return vocab
        emb = self.shards[0].get("tok_embeddings.weight")
        if emb is None or emb.dim() != 2:
            raise ConfigError(f"vocab_size {vocab} and {self.files[0].name} has no 2-D "
                              "tok_embeddings.weight to take the vocabulary size from")
        return int(emb.shape[0])

    def _validate(self) -> None:
        want = set(self.names)
        dtypes: dict[str, torch.dtype] = {}
        for path, sd in zip(self.files, self.shards, strict=True):
            for key, t in sd.items():
                if key not in want and key != ROPE_FREQS and key not in self.extra:
                    raise CheckpointError(f"{path}: {key}: unexpected tensor (not a parameter of "
                                          "the params.json model)")
                if key in want:
                    check_weight_dtype(path, key, t.dtype, dtypes.setdefault(key, t.dtype))
            for name, shape in self.expected:
                if name not in sd:
                    raise CheckpointError(f"{path}: {name}: missing")
                dim = meta_split_dim(name)
                piece = list(shape)
                if dim is not None:
                    piece[dim] //= self.mp
                if list(sd[name].shape) != piece:
                    total = list(sd[name].shape)
                    if dim is not None:
                        total[dim] *= self.mp
                    hint = (f"; {self.mp} shards of it would make {total}" if dim is not None
                            else "")
                    raise CheckpointError(f"{path}: {name}: shape {list(sd[name].shape)}, expected "
                                          f"{piece} (params.json implies {shape} split over "
                                          f"{self.mp} shards{hint})")

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor, str]]:
        for name in self.names:
            pieces = [sd[name] for sd in self.shards]
            dim = meta_split_dim(name)
            if dim is None:
                full = pieces[0].clone()
                for path, p in zip(self.files[1:], pieces[1:], strict=True):
                    if not torch.equal(p, full):
                        raise CheckpointError(f"{path}: {name}: replicated tensor differs from "
                                              f"{self.files[0].name}'s")
            else:
                full = torch.cat(pieces, dim=dim)
            for p in pieces:
                release_pages(p)
            del pieces
            if name == "tok_embeddings.weight" and self.extra:
                self._check_tied(full)
            yield name, full, str(self.files[0] if dim is None else self.path)

    def _check_tied(self, embedding: torch.Tensor) -> None:
        """A tied model's stored ``output.weight`` (if any) must equal the embedding."""
        if not all("output.weight" in sd for sd in self.shards):
            return
        head = torch.cat([sd["output.weight"] for sd in self.shards], dim=meta_split_dim(
            "output.weight"))
        if not torch.equal(head, embedding):
            raise CheckpointError(f"{self.path}: output.weight differs from tok_embeddings.weight "
                                  "but params.json says tie_word_embeddings; remove that field "
                                  "to convert an untied model")

    def close(self) -> None:
        self.shards = []


class MetaSink:
    """Writes ``consolidated.00.pth`` ... ``consolidated.{K-1}.pth`` (every tensor's K-th slices,
    norms and ``rope.freqs`` whole in each), ``params.json`` and, if given, ``tokenizer.model``.
    All K files are open at once, so memory stays at one tensor and its slices."""

    def __init__(self, out: Path, cfg: ModelConfig, dtype: torch.dtype, mp: int,
                 tokenizer: Path | None = None) -> None:
        self.out, self.cfg, self.dtype, self.mp = Path(out), cfg, dtype, mp
        check_mp(cfg, mp, self.out)
        plans: list[list[tuple[str, torch.dtype, list[int]]]] = [[] for _ in range(mp)]
        shapes = model_tensor_shapes(cfg)
        if cfg.tie_embeddings:  # Meta's code needs output.weight: the embedding, written twice
            shapes.insert(1, ("output.weight", shapes[0][1]))
        self.rope_freqs = cfg.vocab_size != LLAMA3_VOCAB and cfg.rope_theta != LLAMA3_THETA
        for name, shape in shapes + [(ROPE_FREQS, [cfg.head_dim // 2])] * self.rope_freqs:
            dim = meta_split_dim(name)
            piece = list(shape)
            if dim is not None:
                piece[dim] //= mp
            for plan in plans:
                plan.append((name, dtype, piece))
        self.files = [TorchZipStream(self.out / f"consolidated.{k:02d}.pth", plans[k])
                      for k in range(mp)]
        self.tokenizer = tokenizer

    def write(self, name: str, t: torch.Tensor) -> None:
        dim = meta_split_dim(name)
        pieces = [t] * self.mp if dim is None else t.chunk(self.mp, dim=dim)
        for f, piece in zip(self.files, pieces, strict=True):
            f.write(name, piece)
        if name == "tok_embeddings.weight" and self.cfg.tie_embeddings:
            self.write("output.weight", t)

    def finish(self) -> None:
        freqs = rope_freqs(self.cfg, self.dtype)
        for f in self.files:
            if self.rope_freqs:
                f.write(ROPE_FREQS, freqs)
            f.close()
        params = self.cfg.to_meta_params()
        (self.out / "params.json").write_text(json.dumps(params) + "\n")
        if self.tokenizer is not None:
            src = Path(self.tokenizer)
            src = src / "tokenizer.model" if src.is_dir() else src
            if not src.is_file():
                raise CheckpointError(f"{src}: tokenizer.model not found")
            shutil.copyfile(src, self.out / "tokenizer.model")

    def abort(self) -> None:
        self.files = []
