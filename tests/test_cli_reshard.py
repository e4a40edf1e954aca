"""megallama-reshard on bad input, one table row per case: every expected failure is one line on
stderr (``megallama-reshard: error: ...`` naming the file or option), exit status 2, no traceback,
and nothing half-written -- the working directory (inputs, destination, temporaries) is byte for
byte what it was before the run. Also: a conversion killed with SIGKILL mid-write is cleaned up by
the next run to the same destination, which then succeeds.

Each row damages a copy of a small valid checkpoint (Meta, HF single-file, HF sharded, megallama)
and runs the real command-line entry, ``megallama.reshard.main``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from megallama.checkpoint.atomic import file_sha256
from megallama.config import preset
from megallama.config.arguments import DEBUG_ENV
from megallama.interop.convert import convert
from megallama.interop.names import meta_tensor_to_hf
from megallama.reshard import main
from tests.test_reshard import one_thread, random_state, write_meta  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
PROG = "megallama-reshard: error: "


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """One valid checkpoint per reader: Meta (2 shards), HF single file, HF sharded (index),
    megallama (tp 2). tiny_gqa: 8 query heads over 2 KV heads, dim 128, 2 layers, vocab 1000."""
    root = tmp_path_factory.mktemp("sources")
    cfg = preset("tiny_gqa", vocab_size=1000, n_layers=2)
    meta = write_meta(root / "meta", cfg, random_state(cfg), k=2)
    convert(f"meta:{meta}", f"hf:{root / 'hf'}", progress=False)
    convert(f"meta:{meta}", f"hf:{root / 'hf_sharded'}", max_shard_size=100_000, progress=False)
    convert(f"meta:{meta}", f"megallama:{root / 'megallama'}", tp=2, progress=False)
    return {"meta": meta, "hf": root / "hf", "hf_sharded": root / "hf_sharded",
            "megallama": root / "megallama"}


# ---- damage --------------------------------------------------------------------------------------
Damage = Callable[[Path, Path], None]  # (the source copy, the working directory)


def edit_pth(name: str, fn: Callable[[dict[str, Any]], Any]) -> Damage:
    """Load a .pth of the source, let ``fn`` change its dict, save it back with torch.save."""
    def damage(src: Path, work: Path) -> None:
        sd = torch.load(src / name, weights_only=True)
        fn(sd)
        torch.save(sd, src / name)
    return damage


def edit_st(name: str, fn: Callable[[dict[str, torch.Tensor]], Any]) -> Damage:
    """Rewrite a safetensors file of the source with ``fn`` applied to its tensors."""
    def damage(src: Path, work: Path) -> None:
        tensors = load_file(src / name)
        fn(tensors)
        save_file(tensors, src / name, metadata={"format": "pt"})
    return damage


def edit_json(name: str, fn: Callable[[Any], Any]) -> Damage:
    """Replace a JSON file of the source by ``fn(its content)``."""
    def damage(src: Path, work: Path) -> None:
        (src / name).write_text(json.dumps(fn(json.loads((src / name).read_text()))))
    return damage


def write_text(name: str, text: str) -> Damage:
    def damage(src: Path, work: Path) -> None:
        (src / name).write_text(text)
    return damage


def edit_bytes(name: str, fn: Callable[[bytes], bytes]) -> Damage:
    def damage(src: Path, work: Path) -> None:
        (src / name).write_bytes(fn((src / name).read_bytes()))
    return damage


def remove(name: str) -> Damage:
    def damage(src: Path, work: Path) -> None:
        os.remove(src / name)
    return damage


def both_meta_shards(fn: Callable[[dict[str, Any]], Any]) -> Damage:
    """The same edit in consolidated.00.pth and .01.pth (a replicated tensor is in both)."""
    first, second = edit_pth("consolidated.00.pth", fn), edit_pth("consolidated.01.pth", fn)
    return lambda src, work: (first(src, work), second(src, work))


def in_work(name: str, content: bytes | None = b"") -> Damage:
    """Create ``name`` in the working directory: a file (``content``) or, for None, a directory."""
    def damage(src: Path, work: Path) -> None:
        if content is None:
            (work / name).mkdir()
        else:
            (work / name).write_bytes(content)
    return damage


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def short_storage_record(src: Path, work: Path) -> None:
    """Rebuild consolidated.00.pth's zip with one tensor record cut to half the bytes its pickle
    declares (plain torch.load refuses this; a mapped load would read past it)."""
    path = src / "consolidated.00.pth"
    with zipfile.ZipFile(path) as z:
        records = [(info.filename, z.read(info.filename)) for info in z.infolist()]
    victim = next(n for n, d in records if "/data/" in n and len(d) > 64)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in records:
            z.writestr(name, data[: len(data) // 2] if name == victim else data)


def first_shard(index: dict[str, Any]) -> str:
    return sorted(index["files"])[0]


def megallama_int8_tensor(src: Path, work: Path) -> None:
    """A shard whose norm.weight is stored as int8 while the index says bfloat16; the index's size
    and sha256 are updated, so only the dtype check can catch it."""
    index = json.loads((src / "model.index.json").read_text())
    fname = index["tensors"]["norm.weight"]["pieces"][0]["file"]
    tensors = load_file(src / fname)
    tensors["norm.weight"] = tensors["norm.weight"].to(torch.int8)
    save_file(tensors, src / fname, metadata={"format": "pt", "writer": "megallama-weights"})
    index["files"][fname] = {"size": (src / fname).stat().st_size,
                             "sha256": file_sha256(src / fname)}
    (src / "model.index.json").write_text(json.dumps(index))


def megallama_index(fn: Callable[[dict[str, Any]], Any]) -> Damage:
    return edit_json("model.index.json", fn)


def megallama_shard_bytes(fn: Callable[[bytes], bytes]) -> Damage:
    """Apply ``fn`` to the first shard file the index lists."""
    def damage(src: Path, work: Path) -> None:
        fname = first_shard(json.loads((src / "model.index.json").read_text()))
        edit_bytes(fname, fn)(src, work)
    return damage


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def hf_index_entry(key: str, value: Any) -> Damage:
    def fn(index: dict[str, Any]) -> dict[str, Any]:
        index["weight_map"][key] = value
        return index
    return edit_json("model.safetensors.index.json", fn)


def hf_swap_files(src: Path, work: Path) -> None:
    """The index says the embedding is in the file that holds the head, and vice versa."""
    path = src / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    wmap = index["weight_map"]
    wmap["model.embed_tokens.weight"], wmap["lm_head.weight"] = (
        wmap["lm_head.weight"], wmap["model.embed_tokens.weight"])
    path.write_text(json.dumps(index))


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda d: {**d, key: value}


def _drop(key: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda d: {k: v for k, v in d.items() if k != key}


def _tensor(name: str, field: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def fn(index: dict[str, Any]) -> dict[str, Any]:
        index["tensors"][name][field] = value
        return index
    return fn


# ---- the table -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One bad input (the row's id names its class: ``opt-`` options, ``path-`` source and
    destination paths, ``meta-``/``hf-``/``mg-`` the three readers). ``src``/``dst``/``extra`` are argv templates: ``{src}`` the damaged source
    copy, ``{fmt}`` its format, ``{work}`` the working directory, ``{dst}`` the destination
    ``{work}/out``, ``{llama_tok}`` the real Llama 2 tokenizer. The last stderr line must contain
    ``names`` (the file or option) and ``says`` (the problem)."""

    source: str | None
    names: str
    says: str
    damage: Damage | None = None
    src: str | None = "{fmt}:{src}"
    dst: str = "hf:{dst}"
    extra: tuple[str, ...] = ()
    usage: bool = False  # an argparse usage error: usage lines above the error line
    dst_exists: bool = False
    llama_tokenizer: bool = False


def row(id: str, source: str | None, names: str, says: str, **kw: Any) -> Any:
    return pytest.param(Case(source, names, says, **kw), id=id)


SHARD0, SHARD1 = "{src}/consolidated.00.pth", "{src}/consolidated.01.pth"
ST, ST_INDEX = "{src}/model.safetensors", "{src}/model.safetensors.index.json"
MG_INDEX = "{src}/model.index.json"

CASES = [
    # ---- command line and options
    row("opt-src-option-missing", None, "--src", "required", src=None, usage=True),
    row("opt-src-spec-unknown-format", "meta", "--src", "expected FORMAT:PATH", src="bogus:{src}",
        usage=True),
    row("opt-dst-spec-without-path", "meta", "--dst", "expected FORMAT:PATH", dst="hf:", usage=True),
    row("opt-tp-0", "meta", "--tp", "0: must be >= 1", dst="megallama:{dst}", extra=("--tp", "0"),
        usage=True),
    row("opt-dtype-bogus", "meta", "--dtype", "invalid choice: 'bogus'", extra=("--dtype", "bogus"),
        usage=True),
    row("opt-max-shard-size-bogus", "meta", "--max-shard-size", "expected a size",
        extra=("--max-shard-size", "5XB"), usage=True),
    row("opt-tp-3-does-not-divide-heads", "meta", "{dst}: --tp 3", "does not divide n_heads=8",
        dst="megallama:{dst}", extra=("--tp", "3")),
    row("opt-pp-above-n-layers", "meta", "{dst}: --pp 3", "n_layers=2", dst="megallama:{dst}",
        extra=("--pp", "3")),
    row("opt-mp-4-does-not-divide-kv-heads", "meta", "{dst}", "4 model-parallel shards do not divide",
        dst="meta:{dst}", extra=("--mp", "4")),
    row("opt-lossy-cast-without-dtype", "meta", f"{SHARD0}: layers.1.ffn_norm.weight",
        "pass --dtype", damage=both_meta_shards(lambda sd: sd.update(
            {"layers.1.ffn_norm.weight": sd["layers.1.ffn_norm.weight"].float() + 1e-3}))),
    row("opt-fp16-overflow", "meta", f"{SHARD0}: norm.weight", "beyond float16's range",
        extra=("--dtype", "fp16"),
        damage=both_meta_shards(lambda sd: sd["norm.weight"].__setitem__(3, 7.0e4))),
    row("opt-tokenizer-missing", "meta", "--tokenizer {work}/nope.model", "not found",
        extra=("--tokenizer", "{work}/nope.model")),
    row("opt-tokenizer-not-sentencepiece", "meta", "--tokenizer {work}/junk.model",
        "not a valid SentencePiece model",
        damage=in_work("junk.model", b"not a sentencepiece model"),
        extra=("--tokenizer", "{work}/junk.model")),
    row("opt-tokenizer-wrong-vocab", "meta", "--tokenizer {llama_tok}",
        "model vocab_size 1000 != tokenizer vocab_size 32000", llama_tokenizer=True,
        extra=("--tokenizer", "{llama_tok}")),
    row("opt-tokenizer-dir-without-model", "meta", "--tokenizer {work}/tok", "no tokenizer.model",
        damage=in_work("tok", None), dst="megallama:{dst}", extra=("--tokenizer", "{work}/tok")),
    # ---- source and destination paths
    row("path-src-dir-missing", None, "{work}/nowhere", "not a directory", src="meta:{work}/nowhere"),
    row("path-src-is-a-file", None, "{work}/afile", "not a directory", src="meta:{work}/afile",
        damage=in_work("afile")),
    row("path-dst-exists", "meta", "{dst}", "already exists", damage=in_work("out", None),
        dst_exists=True),
    row("path-dst-parent-is-a-file", "meta", "{work}/blocker/", "Not a directory",
        damage=in_work("blocker"), dst="hf:{work}/blocker/out"),
    row("path-dst-parents-created-then-error", "meta", SHARD0, "pass --dtype",
        dst="hf:{work}/new/deeper/out", damage=both_meta_shards(lambda sd: sd.update(
            {"norm.weight": sd["norm.weight"].float()}))),
    # ---- Meta consolidated
    row("meta-params-missing", "meta", "{src}/params.json", "not found",
        damage=remove("params.json")),
    row("meta-params-not-json", "meta", "{src}/params.json", "Expecting",
        damage=write_text("params.json", '{"dim": 128,')),
    row("meta-params-a-list", "meta", "{src}/params.json", "expected a JSON object",
        damage=write_text("params.json", "[1, 2]")),
    row("meta-params-n-heads-0", "meta", "{src}/params.json", "n_heads=0: must be >= 1",
        damage=edit_json("params.json", _set("n_heads", 0))),
    row("meta-params-norm-eps-string", "meta", "{src}/params.json", "norm_eps='1e-5'",
        damage=edit_json("params.json", _set("norm_eps", "1e-5"))),
    row("meta-params-vocab-string", "meta", "{src}/params.json", "vocab_size='many'",
        damage=edit_json("params.json", _set("vocab_size", "many"))),
    row("meta-params-rope-scaling-a-list", "meta", "{src}/params.json",
        "rope_scaling=[2]: expected an object or null",
        damage=edit_json("params.json", _set("rope_scaling", [2]))),
    row("meta-vocab-minus-1-without-embedding", "meta", "{src}/params.json", "vocab_size -1",
        damage=both_meta_shards(lambda sd: sd.pop("tok_embeddings.weight"))),
    row("meta-no-consolidated-files", "meta", "{src}", "no consolidated.NN.pth files",
        damage=lambda src, work: [os.remove(p) for p in src.glob("*.pth")]),
    row("meta-shard-number-missing", "meta", "{src}", "a shard is missing",
        damage=lambda src, work: os.rename(src / "consolidated.01.pth",
                                           src / "consolidated.02.pth")),
    row("meta-missing-tensor", "meta", f"{SHARD1}: layers.1.feed_forward.w3.weight", "missing",
        damage=edit_pth("consolidated.01.pth",
                        lambda sd: sd.pop("layers.1.feed_forward.w3.weight"))),
    row("meta-extra-tensor", "meta", f"{SHARD1}: layers.9.attention.wq.weight",
        "unexpected tensor", damage=edit_pth("consolidated.01.pth", lambda sd: sd.update(
            {"layers.9.attention.wq.weight": torch.zeros(1)}))),
    row("meta-wrong-shape", "meta", f"{SHARD1}: layers.0.attention.wq.weight",
        "shape [64, 127], expected [64, 128]", damage=edit_pth("consolidated.01.pth",
                                                               lambda sd: sd.update(
            {"layers.0.attention.wq.weight": torch.zeros(64, 127, dtype=torch.bfloat16)}))),
    row("meta-replicated-copies-differ", "meta", f"{SHARD1}: norm.weight", "differs",
        damage=edit_pth("consolidated.01.pth", lambda sd: sd["norm.weight"].__setitem__(0, 9))),
    row("meta-integer-tensor", "meta", f"{SHARD1}: norm.weight", "dtype int8 is not float32/",
        damage=edit_pth("consolidated.01.pth",
                        lambda sd: sd.update({"norm.weight": sd["norm.weight"].to(torch.int8)}))),
    row("meta-float64-tensor", "meta", f"{SHARD0}: tok_embeddings.weight",
        "dtype float64 is not float32/", damage=edit_pth("consolidated.00.pth", lambda sd: sd.update(
            {"tok_embeddings.weight": sd["tok_embeddings.weight"].double()}))),
    row("meta-non-tensor-value", "meta", SHARD1, "not a dict of tensors",
        damage=edit_pth("consolidated.01.pth", lambda sd: sd.update({"step": 5}))),
    row("meta-pickle-runs-code", "meta", SHARD1, "refused to unpickle",
        damage=edit_pth("consolidated.01.pth", lambda sd: sd.update({"payload": _Exploit()}))),
    row("meta-pth-truncated", "meta", SHARD0, "not a readable torch checkpoint",
        damage=edit_bytes("consolidated.00.pth", lambda b: b[: len(b) // 2])),
    row("meta-short-storage-record", "meta", f"{SHARD0}: storage", "truncated or damaged",
        damage=short_storage_record),
    # ---- Hugging Face
    row("hf-config-missing", "hf", "{src}/config.json", "not found", damage=remove("config.json")),
    row("hf-config-a-list", "hf", "{src}/config.json", "expected a JSON object",
        damage=write_text("config.json", "[]")),
    row("hf-config-field-missing", "hf", "{src}/config.json", "missing field 'hidden_size'",
        damage=edit_json("config.json", _drop("hidden_size"))),
    row("hf-model-type-mistral", "hf", "{src}/config.json", "model_type 'mistral'",
        damage=edit_json("config.json", _set("model_type", "mistral"))),
    row("hf-tied-embeddings", "hf", "{src}/config.json", "tie_word_embeddings",
        damage=edit_json("config.json", _set("tie_word_embeddings", True))),
    row("hf-rope-scaling-a-string", "hf", "{src}/config.json", "rope_scaling='yes'",
        damage=edit_json("config.json", _set("rope_scaling", "yes"))),
    row("hf-rope-factor-not-a-number", "hf", "{src}/config.json", "rope_scaling.factor='x'",
        damage=edit_json("config.json", _set("rope_scaling", {"type": "linear", "factor": "x"}))),
    row("hf-rope-factor-nan", "hf", "{src}/config.json", "rope_scaling.factor=nan",
        damage=edit_json("config.json", _set("rope_scaling", {"type": "linear",
                                                              "factor": float("nan")}))),
    row("hf-no-weights", "hf", "{src}", "neither model.safetensors",
        damage=remove("model.safetensors")),
    row("hf-truncated", "hf", ST, "not a readable safetensors file",
        damage=edit_bytes("model.safetensors", lambda b: b[:-100])),
    row("hf-corrupt-header", "hf", ST, "not a readable safetensors file",
        damage=edit_bytes("model.safetensors", lambda b: b[:8] + b"{x" + b[10:])),
    row("hf-integer-tensor", "hf", f"{ST}: model.norm.weight", "dtype I8 is not F32/BF16/F16",
        damage=edit_st("model.safetensors", lambda t: t.update(
            {"model.norm.weight": t["model.norm.weight"].to(torch.int8)}))),
    row("hf-wrong-shape", "hf", f"{ST}: model.norm.weight", "shape [127], config.json implies",
        damage=edit_st("model.safetensors", lambda t: t.update(
            {"model.norm.weight": t["model.norm.weight"][:127].clone()}))),
    row("hf-index-lists-missing-file", "hf_sharded", "{src}/model-00099-of-00099.safetensors",
        "does not exist", damage=hf_index_entry("model.norm.weight",
                                                "model-00099-of-00099.safetensors")),
    row("hf-index-not-json", "hf_sharded", ST_INDEX, "malformed safetensors index",
        damage=write_text("model.safetensors.index.json", '{"weight_map": {')),
    row("hf-index-weight-map-a-list", "hf_sharded", ST_INDEX, "malformed safetensors index",
        damage=write_text("model.safetensors.index.json", '{"weight_map": ["a", "b"]}')),
    row("hf-index-file-name-not-a-string", "hf_sharded", ST_INDEX, "model.norm.weight",
        damage=hf_index_entry("model.norm.weight", 7)),
    row("hf-index-file-outside-the-directory", "hf_sharded", ST_INDEX, "../",
        damage=hf_index_entry("model.norm.weight", "../hf/model.safetensors")),
    row("hf-index-names-the-wrong-file", "hf_sharded", "model.embed_tokens.weight",
        "not listed for this file", damage=hf_swap_files),
    # ---- megallama
    row("mg-index-missing", "megallama", MG_INDEX, "checkpoint index not found",
        damage=remove("model.index.json")),
    row("mg-index-not-json", "megallama", MG_INDEX, "not valid JSON",
        damage=write_text("model.index.json", '{"format": "megallama-weights",')),
    row("mg-index-tensors-a-list", "megallama", MG_INDEX, "malformed checkpoint index",
        damage=megallama_index(_set("tensors", []))),
    row("mg-index-split-dim-out-of-range", "megallama", MG_INDEX, "malformed checkpoint index",
        damage=megallama_index(_tensor("output.weight", "split_dim", 5))),
    row("mg-index-file-outside-the-directory", "megallama", MG_INDEX, "'../x.safetensors'",
        damage=megallama_index(lambda i: {**i, "files": {**i["files"], "../x.safetensors": {
            "size": 1, "sha256": "0"}}})),
    row("mg-index-unknown-dtype", "megallama", f"{MG_INDEX}: norm.weight", "dtype 'float99'",
        damage=megallama_index(_tensor("norm.weight", "dtype", "float99"))),
    row("mg-index-int8-dtype", "megallama", f"{MG_INDEX}: norm.weight", "dtype 'int8'",
        damage=megallama_index(_tensor("norm.weight", "dtype", "int8"))),
    row("mg-index-wrong-shape", "megallama", f"{MG_INDEX}: tok_embeddings.weight",
        "shape [1000, 64], model_config implies [1000, 128]",
        damage=megallama_index(_tensor("tok_embeddings.weight", "shape", [1000, 64]))),
    row("mg-shard-missing", "megallama", "model-pp00-tp00.safetensors", "shard is missing",
        damage=remove("model-pp00-tp00.safetensors")),
    row("mg-shard-truncated", "megallama", "{src}/model-pp00-tp00.safetensors",
        "truncated", damage=megallama_shard_bytes(lambda b: b[:-64])),
    row("mg-shard-wrong-sha256", "megallama", "{src}/model-pp00-tp00.safetensors",
        "sha256 checksum mismatch", damage=megallama_shard_bytes(flip_last_byte)),
    row("mg-shard-int8-tensor", "megallama", "norm.weight", "I8",
        damage=megallama_int8_tensor),
]


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a file's sha256, ``dir`` for a directory (new temporaries and
    a created destination show up as added entries)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _argv(case: Case, fields: dict[str, Any]) -> list[str]:
    argv = [] if case.src is None else ["--src", case.src.format(**fields)]
    argv += ["--dst", case.dst.format(**fields), "--no-progress"]
    return argv + [a.format(**fields) for a in case.extra]


def _run(argv: list[str]) -> int:
    """The command-line entry's exit status (argparse's usage errors raise SystemExit)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_leaves_nothing(case: Case, sources, tmp_path, request,
                                                 capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    src = tmp_path / "src"
    if case.source is not None:
        shutil.copytree(sources[case.source], src)
    if case.damage is not None:
        case.damage(src, tmp_path)
    fields = {"src": src, "work": tmp_path, "dst": tmp_path / "out",
              "fmt": "hf" if case.source == "hf_sharded" else case.source,
              "llama_tok": request.getfixturevalue("llama_tokenizer_path")
              if case.llama_tokenizer else None}
    before = snapshot(tmp_path)
    capsys.readouterr()
    code = _run(_argv(case, fields))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err
    assert lines and lines[-1].startswith(PROG), err
    assert len(lines) == 1 or (case.usage and lines[0].startswith("usage: ")), err
    assert case.names.format(**fields) in lines[-1], lines[-1]
    assert case.says in lines[-1], lines[-1]
    assert snapshot(tmp_path) == before  # inputs unchanged, no destination, no temporaries
    assert case.dst_exists or not (tmp_path / "out").exists()


def test_debug_adds_the_traceback_above_the_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "1")
    assert main(["--src", f"meta:{tmp_path / 'nowhere'}", "--dst", f"hf:{tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith(PROG)


def test_unexpected_errors_keep_their_traceback(sources, tmp_path, monkeypatch):
    """A bug is not an expected failure: it is not turned into a one-line message."""
    import megallama.interop.convert as convert_mod

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(convert_mod, "convert", broken)
    with pytest.raises(ZeroDivisionError):
        main(["--src", f"meta:{sources['meta']}", "--dst", f"hf:{tmp_path / 'out'}"])


def test_interrupt_is_one_line_and_status_130(sources, tmp_path, capsys, monkeypatch):
    import megallama.interop.convert as convert_mod

    def interrupted(self, name, t):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_mod.HFSink, "write", interrupted)
    assert main(["--src", f"meta:{sources['meta']}", "--dst", f"hf:{tmp_path / 'out'}",
                 "--no-progress"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(PROG) and "interrupted" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_sigkill_mid_write_then_rerun_succeeds(tmp_path):
    """A conversion killed with SIGKILL while writing leaves its ``.out.tmp-<pid>`` directory
    (nothing can run on SIGKILL) and no destination; the next run to the same destination
    removes it (its process is gone) and succeeds."""
    cfg = preset("tiny", dim=256, n_layers=2, n_heads=8, n_kv_heads=8, vocab_size=32000)
    state = random_state(cfg, torch.float32, seed=1)
    src = write_meta(tmp_path / "meta", cfg, state, k=1)
    dst = tmp_path / "out"
    argv = ["--src", f"meta:{src}", "--dst", f"hf:{dst}", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "megallama.reshard", *argv], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tmp = tmp_path / f".out.tmp-{proc.pid}"
    deadline = time.monotonic() + 300
    try:
        while not _writing(tmp):
            assert proc.poll() is None, f"ended before it could be killed: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no temporary output appeared"
            time.sleep(0.002)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert tmp.is_dir() and not dst.exists()
    assert main(argv) == 0
    assert not list(tmp_path.glob(".out.tmp-*"))
    hf = load_file(dst / "model.safetensors")
    want = dict(meta_tensor_to_hf(n, t, cfg) for n, t in state.items())
    assert set(hf) == set(want) and all(torch.equal(hf[k], want[k]) for k in want)


def _writing(tmp: Path) -> bool:
    """Whether a file with some bytes in it exists inside ``tmp`` (the conversion is writing)."""
    try:
        return any(p.stat().st_size > 0 for p in tmp.iterdir())
    except FileNotFoundError:  # not created yet, or renamed away between the two calls
        return False
