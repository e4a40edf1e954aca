"""megallama-reshard: bit-exact round trips between Meta, HF and megallama layouts, format parity
with ``save_model_weights``, an HF export that transformers loads with equal logits, a converted
checkpoint that trains, and one-line errors for bad inputs.

Meta inputs are written with plain ``torch.save`` of fairscale-style slices and HF inputs with
transformers' ``save_pretrained``, so the readers are checked against independent writers.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megallama.checkpoint.atomic import CheckpointError
from megallama.checkpoint.weights import (
    _local_shard,
    _named_params,
    load_model_weights,
    read_index,
    shard_file_name,
)
from megallama.config import preset
from megallama.interop.convert import convert
from megallama.interop.meta import ROPE_FREQS, rope_freqs
from megallama.interop.names import meta_split_dim, model_tensor_shapes
from megallama.model.layout import stage_cuts
from megallama.model.llama import Transformer
from megallama.reshard import main, parse_size
from tests.test_layout import RankTP


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: extra threads only contend on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_state(cfg, dtype=torch.bfloat16, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(dtype) for n, s in model_tensor_shapes(cfg)}


def write_meta(path: Path, cfg, state: dict[str, torch.Tensor], k: int) -> Path:
    """A consolidated checkpoint as Meta ships it: fairscale slices, rope.freqs, vocab_size -1."""
    path.mkdir(parents=True)
    for i in range(k):
        sd = {ROPE_FREQS: rope_freqs(cfg, torch.bfloat16)}
        for name, t in state.items():
            dim = meta_split_dim(name)
            sd[name] = t.clone() if dim is None else t.chunk(k, dim)[i].clone()
        torch.save(sd, path / f"consolidated.{i:02d}.pth")
    params = {**cfg.to_meta_params(), "vocab_size": -1}
    (path / "params.json").write_text(json.dumps(params))
    return path


def load_meta(path: Path) -> list[dict[str, torch.Tensor]]:
    files = sorted(path.glob("consolidated.*.pth"))
    return [torch.load(f, weights_only=True, mmap=True) for f in files]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_transformers_agrees(hf_dir: Path, cfg, state: dict[str, torch.Tensor]) -> None:
    """transformers is the oracle of an HF export: LlamaConfig reads ``cfg``'s sizes, heads, KV
    heads, eps, RoPE theta and vocabulary from its config.json, LlamaForCausalLM loads every tensor
    (none missing, unexpected or misshapen) in the dtype of ``state``, and its logits equal those of
    megallama's model holding the Meta-layout ``state`` (both in fp32)."""
    transformers = pytest.importorskip("transformers")
    c = transformers.LlamaConfig.from_pretrained(hf_dir)
    rope = {**(getattr(c, "rope_scaling", None) or {}), **(getattr(c, "rope_parameters", None) or {})}
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.rms_norm_eps, rope.get("rope_theta", getattr(c, "rope_theta", None)),
            c.vocab_size) == (cfg.dim, state["layers.0.feed_forward.w1.weight"].shape[0], cfg.n_layers,
                              cfg.n_heads, cfg.n_kv_heads, cfg.norm_eps, cfg.rope_theta, cfg.vocab_size)
    hf, info = transformers.LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="eager",
                                                             output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert {t.dtype for t in hf_tensors(hf_dir).values()} == {t.dtype for t in state.values()}
    ours = Transformer(cfg).eval()
    ours.load_state_dict({n: t.float() for n, t in state.items()})
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ours.full_logits(tokens), hf.float().eval()(tokens).logits
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-4, f"transformers' logits of {hf_dir} differ from the weights': {err:.2e}"


def test_meta_hf_meta_round_trip_is_bit_exact(tmp_path):
    cfg = preset("tiny_gqa", vocab_size=1000)
    state = random_state(cfg)
    src = write_meta(tmp_path / "meta", cfg, state, k=2)
    convert(f"meta:{src}", f"hf:{tmp_path / 'hf'}", max_shard_size=400_000, progress=False)
    shards = sorted((tmp_path / "hf").glob("model-*-of-*.safetensors"))
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert all(p.stat().st_size < 400_000 + 4096 for p in shards)  # data <= 400 kB + header
    assert_transformers_agrees(tmp_path / "hf", cfg, state)  # q/k permuted, k with the KV heads
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["torch_dtype"] == "bfloat16"
    convert(f"hf:{tmp_path / 'hf'}", f"meta:{tmp_path / 'back'}", mp=2, progress=False)
    for orig, back in zip(load_meta(src), load_meta(tmp_path / "back"), strict=True):
        assert_same(orig, back)
    params = json.loads((tmp_path / "back" / "params.json").read_text())
    assert params == {**cfg.to_meta_params()}
    assert not list(tmp_path.glob(".*tmp*"))  # temporary directories renamed away


@pytest.fixture(scope="module")
def hf_gqa(tmp_path_factory) -> tuple[Path, object]:
    """An HF checkpoint written by transformers itself (fp32, vocab 1001: padded at tp=2)."""
    transformers = pytest.importorskip("transformers")
    cfg = preset("tiny_gqa", vocab_size=1001)
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf_config()))
    path = tmp_path_factory.mktemp("hf") / "src"
    model.save_pretrained(path)
    return path, cfg




def test_hf_megallama_hf_round_trip_and_save_model_weights_parity(hf_gqa, tmp_path):
    src, cfg = hf_gqa
    mg = tmp_path / "mg"
    convert(f"hf:{src}", f"megallama:{mg}", tp=2, pp=2, progress=False)
    convert(f"megallama:{mg}", f"hf:{tmp_path / 'hf'}", progress=False)
    assert_same(hf_tensors(src), hf_tensors(tmp_path / "hf"))
    index = read_index(mg)
    assert index["saved_layout"] == {"tp": 2, "pp": 2, "dp": 1}
    # every shard holds exactly what save_model_weights would write from that (stage, tp rank)
    cuts = stage_cuts(cfg, 2)
    for r in range(2):
        tp = RankTP(n=2, r=r, kv=1)
        model = Transformer(cfg, tp, seed=99)
        load_model_weights(model.named_layers(), tp, mg, cfg)
        layers = model.named_layers()
        for stage in range(2):
            want, entries = _local_shard(_named_params(layers[cuts[stage]:cuts[stage + 1]]), tp,
                                         cfg, mg)
            fname = shard_file_name(stage, r)
            assert_same(want, load_file(mg / fname))
            for name, e in entries.items():
                entry = index["tensors"][name]
                assert [entry[k] for k in ("shape", "dtype", "split_dim")] == [
                    e["shape"], e["dtype"], e["split_dim"]]
                assert {"file": fname, "offset": e["offset"], "length": e["length"]} in entry["pieces"]
    with safe_open(mg / shard_file_name(1, 1), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "writer": "megallama-weights"}
        assert f.get_slice("output.weight").get_shape() == [500, 128]  # the padding row is not stored


def test_70b_shaped_gqa_meta8_megallama_tp4_pp2_meta8_and_hf(tmp_path):
    cfg = preset("tiny_70b_shape", vocab_size=512)
    state = random_state(cfg, seed=5)
    src = write_meta(tmp_path / "meta", cfg, state, k=8)
    mg = tmp_path / "mg"
    convert(f"meta:{src}", f"megallama:{mg}", tp=4, pp=2, progress=False)
    wk = read_index(mg)["tensors"]["layers.0.attention.wk.weight"]
    # 8 KV heads of width 4 over 4 ranks: two heads each
    assert [(p["offset"], p["length"]) for p in wk["pieces"]] == [(0, 8), (8, 8), (16, 8), (24, 8)]
    convert(f"megallama:{mg}", f"meta:{tmp_path / 'back'}", mp=8, progress=False)
    for orig, back in zip(load_meta(src), load_meta(tmp_path / "back"), strict=True):
        assert_same(orig, back)
    convert(f"megallama:{mg}", f"hf:{tmp_path / 'hf'}", progress=False)
    assert_transformers_agrees(tmp_path / "hf", cfg, state)


def test_kv_replicated_slices_stored_once(tmp_path):
    cfg = preset("tiny_gqa", vocab_size=1000)  # 2 KV heads at tp=4: each held by 2 ranks
    src = write_meta(tmp_path / "meta", cfg, random_state(cfg, torch.float32), k=1)
    convert(f"meta:{src}", f"megallama:{tmp_path / 'mg'}", tp=4, pp=1, progress=False)
    wv = read_index(tmp_path / "mg")["tensors"]["layers.3.attention.wv.weight"]
    assert [(p["file"], p["offset"]) for p in wv["pieces"]] == [
        (shard_file_name(0, 0), 0), (shard_file_name(0, 2), 16)]  # 2 heads of width 16


def test_hf_export_loads_in_transformers_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = preset("tiny_gqa", vocab_size=512)
    model = Transformer(cfg, seed=7).eval()
    meta = tmp_path / "meta"
    meta.mkdir()
    torch.save(model.state_dict(), meta / "consolidated.00.pth")
    (meta / "params.json").write_text(json.dumps(cfg.to_meta_params()))
    convert(f"meta:{meta}", f"hf:{tmp_path / 'hf'}", progress=False)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model.full_logits(tokens), hf.eval()(tokens).logits
    assert theirs.dtype == torch.float32
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-5


# transformers' LlamaForCausalLM parameter names, written out here (not megallama's table)
_HF_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_HF_LAYER = {"attention.wq.weight": "self_attn.q_proj.weight",
             "attention.wk.weight": "self_attn.k_proj.weight",
             "attention.wv.weight": "self_attn.v_proj.weight",
             "attention.wo.weight": "self_attn.o_proj.weight",
             "feed_forward.w1.weight": "mlp.gate_proj.weight",
             "feed_forward.w2.weight": "mlp.down_proj.weight",
             "feed_forward.w3.weight": "mlp.up_proj.weight",
             "attention_norm.weight": "input_layernorm.weight",
             "ffn_norm.weight": "post_attention_layernorm.weight"}


def _from_transformers(name: str, theirs: dict[str, torch.Tensor], cfg) -> torch.Tensor:
    """megallama's (Meta) parameter ``name`` taken from transformers' state dict ``theirs``, q/k
    rows back in Meta's interleaved order: Meta row 2i + j of a head is HF row j * d/2 + i."""
    _, layer, rest = name.split(".", 2) if name.startswith("layers.") else (None, None, name)
    w = theirs[_HF_TOP[name] if layer is None else f"model.layers.{layer}.{_HF_LAYER[rest]}"]
    heads = {"attention.wq.weight": cfg.n_heads, "attention.wk.weight": cfg.n_kv_heads}.get(rest)
    if heads is None:
        return w
    d = cfg.head_dim
    return w[[h * d + j * (d // 2) + i for h in range(heads) for i in range(d // 2) for j in (0, 1)]]


def test_converted_checkpoint_resumes_training(hf_gqa, tmp_path):
    """HF (written by transformers) -> megallama at tp=2, pp=2, loaded into a Transformer at tp=1:
    every tensor is transformers' own, bit for bit (q/k rows in Meta's order, derived here); the
    first AdamW step (the engine's optimizer on one rank) starts from the loss transformers' model
    gives on that batch, and the loss goes down."""
    transformers = pytest.importorskip("transformers")
    from megallama.checkpoint.lookup import find_checkpoint

    src, cfg = hf_gqa
    mg = tmp_path / "mg"
    convert(f"hf:{src}", f"megallama:{mg}", tp=2, pp=2, progress=False)
    assert find_checkpoint(mg) == mg
    model = Transformer(cfg, seed=1)
    load_model_weights(model.named_layers(), model.tp, mg, cfg)
    hf = transformers.LlamaForCausalLM.from_pretrained(src, attn_implementation="eager").float().eval()
    theirs = {n: t for n, t in hf.state_dict().items() if "rotary" not in n}
    ours = model.state_dict()
    assert len(ours) == len(theirs) == 3 + 9 * cfg.n_layers
    for name, t in ours.items():
        want = _from_transformers(name, theirs, cfg)
        assert t.dtype == want.dtype and torch.equal(t, want), name
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = hf(tokens[:, :-1]).logits
        oracle = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    losses = []
    for _ in range(3):
        loss = model.loss(model(tokens[:, :-1]), tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - oracle.item()) < 1e-5 * oracle.item(), (losses[0], oracle.item())
    assert losses[-1] < losses[0]


# ---- bad inputs ----------------------------------------------------------------------------------
@pytest.fixture
def meta2(tmp_path) -> Path:
    cfg = preset("tiny_gqa", vocab_size=1000)
    return write_meta(tmp_path / "meta", cfg, random_state(cfg), k=2)


def _error(src: str, dst: str, **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        convert(src, dst, progress=False, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    assert not list(Path(dst.split(":", 1)[1]).parent.glob(".*tmp*"))
    return msg


def _edit(path: Path, fn) -> None:
    sd = torch.load(path, weights_only=True)
    fn(sd)
    torch.save(sd, path)


def test_missing_and_extra_keys(meta2, tmp_path):
    shard = meta2 / "consolidated.01.pth"
    _edit(shard, lambda sd: sd.pop("layers.2.feed_forward.w3.weight"))
    msg = _error(f"meta:{meta2}", f"hf:{tmp_path / 'o1'}")
    assert f"{shard}: layers.2.feed_forward.w3.weight: missing" in msg
    _edit(shard, lambda sd: sd.update({"layers.2.feed_forward.w3.weight": sd["layers.2.feed_forward.w1.weight"],
                                       "layers.9.attention.wq.weight": torch.zeros(1)}))
    msg = _error(f"meta:{meta2}", f"hf:{tmp_path / 'o2'}")
    assert f"{shard}: layers.9.attention.wq.weight: unexpected" in msg


def test_shard_count_mismatch(meta2, tmp_path):
    os.rename(meta2 / "consolidated.01.pth", meta2 / "consolidated.02.pth")
    assert "a shard is missing" in _error(f"meta:{meta2}", f"hf:{tmp_path / 'o1'}")
    os.remove(meta2 / "consolidated.02.pth")  # one half-width shard left
    msg = _error(f"meta:{meta2}", f"hf:{tmp_path / 'o2'}")
    assert f"{meta2 / 'consolidated.00.pth'}: tok_embeddings.weight: shape [1000, 64]" in msg


def test_gqa_head_counts_that_do_not_divide(meta2, tmp_path):
    params = json.loads((meta2 / "params.json").read_text())
    assert "n_kv_heads=2" in _error(f"meta:{meta2}", f"meta:{tmp_path / 'o'}", mp=4)
    msg = _error(f"meta:{meta2}", f"megallama:{tmp_path / 'o'}", tp=3)
    assert msg.startswith(f"{tmp_path / 'o'}: --tp 3: ") and "n_heads=8" in msg
    (meta2 / "params.json").write_text(json.dumps({**params, "n_kv_heads": 3}))
    msg = _error(f"meta:{meta2}", f"hf:{tmp_path / 'o'}")
    assert msg.startswith(f"{meta2 / 'params.json'}: ") and "n_kv_heads=3" in msg


def test_lossy_dtype_needs_dtype_flag(meta2, tmp_path):
    shard = meta2 / "consolidated.00.pth"
    for path in (shard, meta2 / "consolidated.01.pth"):  # a replicated tensor: in both
        _edit(path, lambda sd: sd.update(
            {"layers.1.ffn_norm.weight": sd["layers.1.ffn_norm.weight"].float() + 1e-3}))
    msg = _error(f"meta:{meta2}", f"hf:{tmp_path / 'o'}")
    assert f"{shard}: layers.1.ffn_norm.weight: stored as float32" in msg and "--dtype" in msg
    # widening is lossless; narrowing is accepted when asked for
    convert(f"meta:{meta2}", f"hf:{tmp_path / 'fp32'}", dtype="fp32", progress=False)
    convert(f"hf:{tmp_path / 'fp32'}", f"meta:{tmp_path / 'bf16'}", dtype="bf16", mp=2,
            progress=False)


def test_fp16_conversion_refuses_values_beyond_its_range(meta2, tmp_path):
    for path in (meta2 / "consolidated.00.pth", meta2 / "consolidated.01.pth"):
        _edit(path, lambda sd: sd["norm.weight"].__setitem__(3, 7.0e4))  # bf16, fine there
    msg = _error(f"meta:{meta2}", f"hf:{tmp_path / 'o'}", dtype="fp16")
    assert msg.startswith(f"{meta2 / 'consolidated.00.pth'}: norm.weight: 1 value(s) beyond "
                          "float16's range (+-65504; largest 70144) would become inf")
    convert(f"meta:{meta2}", f"hf:{tmp_path / 'ok'}", dtype="fp32", progress=False)


def test_short_storage_record_is_refused_not_read_past(meta2, tmp_path):
    """A .pth whose storage record holds fewer bytes than its pickle declares: plain torch.load
    refuses it, the mapped reader must too (it would build weights from the following bytes)."""
    shard = meta2 / "consolidated.00.pth"
    with zipfile.ZipFile(shard) as z:
        records = [(info.filename, z.read(info.filename)) for info in z.infolist()]
    victim = next(n for n, d in records if "/data/" in n and len(d) > 64)
    with zipfile.ZipFile(shard, "w", zipfile.ZIP_STORED) as z:
        for name, data in records:
            z.writestr(name, data[: len(data) // 2] if name == victim else data)
    with pytest.raises(RuntimeError, match="record size"):
        torch.load(shard, weights_only=True)  # the oracle: torch itself refuses the file
    msg = _error(f"meta:{meta2}", f"hf:{tmp_path / 'o'}")
    key = victim.rsplit("/", 1)[1]
    assert msg.startswith(f"{shard}: storage {key} holds ") and "truncated or damaged" in msg


@pytest.mark.parametrize("fmt", ["meta", "hf"])
@pytest.mark.parametrize("content,message", [
    ("[1, 2]", "expected a JSON object"),
    ('{"dim": 128, "n_layers": 2, "n_heads": 0}', "n_heads=0: must be >= 1"),
    ('{"dim": 128, "n_layers": 2, "n_heads": 8, "norm_eps": "1e-5"}', "norm_eps='1e-5'"),
])
def test_params_and_config_json_values_are_checked(meta2, hf_gqa, tmp_path, fmt, content,
                                                   message):
    src = meta2 if fmt == "meta" else hf_gqa[0]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    name = "params.json" if fmt == "meta" else "config.json"
    if fmt == "hf" and content.startswith("{"):  # the same values under HF's names
        fields = json.loads((src / name).read_text())
        swap = {"n_heads": "num_attention_heads", "norm_eps": "rms_norm_eps"}
        for key, value in json.loads(content).items():
            if key in swap:
                fields[swap[key]] = value
        content = json.dumps(fields)
    (bad / name).write_text(content)
    msg = _error(f"{fmt}:{bad}", f"megallama:{tmp_path / 'o'}")
    assert msg.startswith(f"{bad / name}: ") and message.replace("n_heads", "n_heads") in msg, msg


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_with_code_is_refused(meta2, tmp_path):
    shard = meta2 / "consolidated.01.pth"
    sd = torch.load(shard, weights_only=True)
    sd["payload"] = _Exploit()
    torch.save(sd, shard)
    msg = _error(f"meta:{meta2}", f"hf:{tmp_path / 'o'}")
    assert msg.startswith(f"{shard}: refused to unpickle") and "GLOBAL posix.system" in msg


def test_hf_shape_and_config_errors(hf_gqa, tmp_path):
    src, _ = hf_gqa
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").symlink_to(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "intermediate_size": 512}))
    msg = _error(f"hf:{bad}", f"meta:{tmp_path / 'o'}")
    assert msg.startswith(f"{bad / 'model.safetensors'}: model.layers.") and "[128, 512]" in msg
    (bad / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 5}))
    msg = _error(f"hf:{bad}", f"meta:{tmp_path / 'o'}")
    assert msg.startswith(f"{bad / 'model.safetensors'}: model.layers.4.") and "missing" in msg
    scaled = {**config, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    (bad / "config.json").write_text(json.dumps(scaled))
    assert "rope_scaling" in _error(f"hf:{bad}", f"meta:{tmp_path / 'o'}")
    (bad / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    assert _error(f"hf:{bad}", f"meta:{tmp_path / 'o'}").startswith(f"{bad / 'config.json'}: ")


def test_damaged_single_file_hf_and_integer_tensors(hf_gqa, tmp_path):
    """The single-file layout megallama writes for small models: truncated, corrupted header, or a
    tensor of an integer dtype are one line naming the file (were tracebacks)."""
    src, _ = hf_gqa
    for name, damage in [("truncated", lambda b: b[:-100]), ("header", lambda b: b[:8] + b"{x" +
                                                             b[10:])]:
        bad = tmp_path / name
        shutil.copytree(src, bad)
        data = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(damage(data))
        msg = _error(f"hf:{bad}", f"megallama:{tmp_path / 'o'}")
        assert msg.startswith(f"{bad / 'model.safetensors'}: not a readable safetensors file")
    ints = tmp_path / "ints"
    shutil.copytree(src, ints)
    tensors = hf_tensors(src)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int8)
    save_file(tensors, ints / "model.safetensors")
    msg = _error(f"hf:{ints}", f"megallama:{tmp_path / 'o'}")
    assert msg == f"{ints / 'model.safetensors'}: model.norm.weight: dtype I8 is not F32/BF16/F16 " \
                  "(not Llama weights)"


def test_killed_conversions_leave_nothing_behind(meta2, tmp_path, monkeypatch):
    """A SIGTERM mid-conversion removes the temporary output; the temporary directory of a
    SIGKILLed conversion (its process gone) is removed by the next run on that destination, while
    one of a live process is left alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    stale, live = tmp_path / f".out.tmp-{dead.pid}", tmp_path / f".out.tmp-{os.getppid()}"
    for d in (stale, live):
        (d / "sub").mkdir(parents=True)
    import megallama.interop.convert as convert_mod

    def terminated(self, name, t):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(convert_mod.MegallamaSink, "write", terminated)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as info:
            main(["--src", f"meta:{meta2}", "--dst", f"megallama:{out}", "--no-progress"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert info.value.code == 128 + signal.SIGTERM
    assert not stale.exists() and live.exists() and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["meta", live.name])


def test_cli(meta2, tmp_path, capsys):
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20
    out = tmp_path / "mg"
    assert main(["--src", f"meta:{meta2}", "--dst", f"megallama:{out}", "--tp", "2", "--pp", "2",
                 "--no-progress"]) == 0
    assert "39 tensors" in capsys.readouterr().out
    assert main(["--src", f"meta:{meta2}", "--dst", f"megallama:{out}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err


@pytest.mark.parametrize("option,value,message", [
    ("--tp", "0", "argument --tp: 0: must be >= 1"), ("--pp", "-1", "argument --pp: -1: must be"),
    ("--mp", "0", "argument --mp: 0: must be >= 1"), ("--seq-len", "0", "--seq-len: 0: must be"),
    ("--tp", "two", "argument --tp: 'two': expected an integer"),
    ("--max-shard-size", "0", "'0': must be at least 1 byte"),
])
def test_cli_refuses_sizes_below_one(meta2, tmp_path, capsys, option, value, message):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as info:
        main(["--src", f"meta:{meta2}", "--dst", f"megallama:{out}", option, value])
    assert info.value.code == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


def test_convert_refuses_tp_below_one(meta2, tmp_path):
    with pytest.raises(CheckpointError, match="must be an integer >= 1"):
        convert(f"meta:{meta2}", f"megallama:{tmp_path / 'o'}", tp=0, progress=False)
    assert not (tmp_path / "o").exists()


def test_unwritable_destination_is_one_line(meta2, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["--src", f"meta:{meta2}", "--dst", f"hf:{blocker / 'out'}", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"megallama-reshard: error: {blocker}/")
    assert "Not a directory" in err[0]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_only(meta2, tmp_path, capsys, monkeypatch):
    argv = ["--src", f"meta:{meta2}", "--tp", "2"]
    assert main([*argv, "--dst", f"megallama:{tmp_path / 'pipe'}"]) == 0
    assert capsys.readouterr().err == ""  # stderr is not a terminal here: no bar
    terminal = _Tty()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main([*argv, "--dst", f"megallama:{tmp_path / 'quiet'}", "--no-progress"]) == 0
    assert terminal.getvalue() == ""
    assert main([*argv, "--dst", f"megallama:{tmp_path / 'tty'}"]) == 0
    text = terminal.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1  # one bar line, closed
    final = text.rstrip("\n").split("\r")[-1]
    assert "100%" in final and "ETA 00:00" in final and "B/s" in final
    assert final.rstrip().endswith("output.weight]")  # the tensor written last (Meta order)
    assert "tensors" in capsys.readouterr().out


def test_error_starts_below_the_bar(meta2, tmp_path, monkeypatch):
    for path in (meta2 / "consolidated.00.pth", meta2 / "consolidated.01.pth"):
        _edit(path, lambda sd: sd.update(
            {"layers.1.ffn_norm.weight": sd["layers.1.ffn_norm.weight"].float()}))
    terminal = _Tty()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["--src", f"meta:{meta2}", "--dst", f"hf:{tmp_path / 'o'}"]) == 2
    bar, error = terminal.getvalue().rsplit("\n", 2)[:2]
    assert "%|" in bar.split("\r")[-1]  # the bar was left where it stood, on its own line
    assert error.startswith("megallama-reshard: error: ") and "--dtype" in error


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("RssFile")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_meta_reader_drops_mapped_pages(tmp_path):
    """Streaming a mapped .pth must not keep every page it touched: the file-backed resident set
    stays near one tensor, not the file size."""
    from megallama.interop.meta import MetaSource

    cfg = preset("tiny", dim=512, n_layers=6, n_heads=8, n_kv_heads=8, vocab_size=1024)
    src = write_meta(tmp_path / "meta", cfg, random_state(cfg, torch.float32), k=1)
    size_kb = (src / "consolidated.00.pth").stat().st_size // 1024
    largest_kb = max(torch.Size(s).numel() for _, s in model_tensor_shapes(cfg)) * 4 // 1024
    base, peak = _rss_file_kb(), 0
    for _name, t, _ in MetaSource(src):
        peak = max(peak, _rss_file_kb() - base)
        del t
    assert size_kb > 10 * largest_kb and peak < 2 * largest_kb + 1024, (size_kb, largest_kb, peak)


def test_pth_writer_is_byte_identical_to_torch_save(tmp_path):
    from megallama.interop.torch_files import TorchZipStream

    tensors = {"a": torch.randn(4, 6).to(torch.bfloat16), "b": torch.randn(8, 3)[4:],
               "c": torch.randn(5).half()}
    (tmp_path / "ours").mkdir()
    (tmp_path / "torch").mkdir()
    stream = TorchZipStream(tmp_path / "ours" / "c.pth",
                            [(k, v.dtype, list(v.shape)) for k, v in tensors.items()])
    for k, v in tensors.items():
        stream.write(k, v)  # "b" is a view with an offset: written as its own storage
    stream.close()
    torch.save({k: v.clone() for k, v in tensors.items()}, tmp_path / "torch" / "c.pth")
    assert (tmp_path / "ours" / "c.pth").read_bytes() == (tmp_path / "torch" / "c.pth").read_bytes()


def test_tokenizer_shipped_with_hf_and_meta_outputs(meta2, tmp_path, llama_tokenizer_path):
    transformers = pytest.importorskip("transformers")
    sentencepiece = pytest.importorskip("sentencepiece")
    # a tokenizer is checked before anything is written: a SentencePiece model of the model's vocab
    msg = _error(f"meta:{meta2}", f"hf:{tmp_path / 'x'}", tokenizer=llama_tokenizer_path)
    assert "model vocab_size 1000 != tokenizer vocab_size 32000" in msg
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    assert _error(f"meta:{meta2}", f"hf:{tmp_path / 'x'}", tokenizer=junk).startswith(
        f"--tokenizer {junk}: ")
    cfg = preset("tiny_gqa", vocab_size=32000, n_layers=1)
    meta = write_meta(tmp_path / "meta32k", cfg, random_state(cfg), k=2)
    convert(f"meta:{meta}", f"hf:{tmp_path / 'hf'}", tokenizer=llama_tokenizer_path,
            progress=False)
    convert(f"hf:{tmp_path / 'hf'}", f"meta:{tmp_path / 'meta_out'}", mp=2,
            tokenizer=llama_tokenizer_path, progress=False)
    assert (tmp_path / "meta_out" / "tokenizer.model").read_bytes() == llama_tokenizer_path.read_bytes()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(llama_tokenizer_path))
    text = "The State of the Union is strong, said the President in 2024."
    assert tok(text)["input_ids"] == [sp.bos_id()] + sp.encode(text)
