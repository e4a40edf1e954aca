"""The layout planner (megallama.training.planner): model states computed by hand, the activation and logits
formulas checked against what autograd really keeps, the bubble, the effect of sequence
parallelism / checkpointing / pipeline depth, the table and JSON output, and clear errors."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from megallama import plan
from megallama.config import ConfigError, preset
from megallama.model.llama import TransformerBlock
from megallama.parallel import cross_entropy
from megallama.parallel.fp8 import convert_to_float8
from megallama.parallel.layers import TensorParallel
from megallama.training import planner, state_bytes

GIB = 1024**3


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = plan.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# ---- model states by hand ------------------------------------------------------------------------
def test_llama2_7b_tp2_pp2_dp2_states_by_hand():
    # A 7B block: wq, wk, wv, wo are 4096 x 4096, w1, w2, w3 are 4096 x 11008; tp=2 splits them,
    # the two RMSNorm weights (4096 each) are replicated. Embedding and head: 32000/2 rows of 4096.
    block = (4 * 4096 * 4096 + 3 * 4096 * 11008) // 2 + 2 * 4096
    table = 16000 * 4096
    assert (block, table) == (101_195_776, 65_536_000)
    stages = planner.estimate_stages(preset("llama2_7b"), planner.Layout(tp=2, pp=2, dp=2),
                                  seq_len=4096, global_batch=1024)
    # FLOP-balanced cut: per-token costs are 438.3M per block, 262.3M for the head, ~8.8M for the
    # embedding, so embedding + 16 blocks | 16 blocks + norm + head minimises the larger stage.
    assert [(r.stage, r.blocks) for r in stages] == [(0, 16), (1, 16)]
    p0, p1 = table + 16 * block, 16 * block + 4096 + table
    assert [r.params for r in stages] == [p0, p1]
    for r, p in zip(stages, (p0, p1), strict=True):
        assert r.weights == 2 * p  # bf16 parameters
        assert r.master == 4 * p // 2  # fp32 master copy, sharded over dp=2 by ZeRO-1
        assert r.optimizer == 8 * p // 2  # Adam m and v in fp32, sharded
        # BF16_Optimizer: an unsharded fp32 accumulator, plus one fresh bf16 gradient (the
        # largest tensor: the embedding / head shard) before it is added in
        assert r.gradients == 4 * p + 2 * table
        assert r.gas == 1024 // (1 * 2) and r.in_flight == 2 - r.stage
    assert state_bytes.optimizer_states(p0, 2, "bf16", 1, "cuda") == state_bytes.States(
        2 * p0, 4 * p0, 0, 0, False, 2 * p0, 4 * p0, 4 * 500_000_000)  # dp>1: all-reduce copy


def test_fp32_cpu_single_process_states_by_hand():
    cfg = preset("tiny")
    n = cfg.num_parameters()  # tp=1: no vocabulary padding, every parameter on the one rank
    r = planner.estimate(cfg, planner.Layout(1, 1, 1, 1), seq_len=64, global_batch=2, precision="fp32",
                      device="cpu", overhead_bytes=123)
    assert (r.params, r.weights, r.master, r.optimizer) == (n, 4 * n, 4 * n, 8 * n)
    assert r.overhead == 123 and r.gas == 2
    # step: ZeRO-1's staging copy of the gradients, then the flat gradient partition with CPU
    # AdamW's two temporaries (sqrt(v) and sqrt(v)/c)
    assert r.step == 4 * n + max(4 * n, 4 * n + 8 * n)


# ---- activations and logits against autograd ---------------------------------------------------
def test_block_activations_by_hand():
    # 'tiny' (dim 128, 8 heads of 16, FFN 352), fp32, 2 x 64 tokens, per token:
    # norms 2*(4+4)*128 + 2*4, linear inputs 2*4*128, SDPA q,k,v,out 4*4*128 + lse 4*8,
    # SwiGLU 4*4*352 (RoPE cos/sin are slices of a buffer, not activations).
    per_token = 2 * 8 * 128 + 8 + 2 * 4 * 128 + 4 * 4 * 128 + 4 * 8 + 4 * 4 * 352
    expected = 128 * per_token
    assert expected == 1_381_376
    assert planner.block_activation_bytes(preset("tiny"), tokens=128, seq_len=64, tp=1,
                                       sequence_parallel=False, element=4) == expected


@pytest.mark.parametrize("name,dtype", [("tiny", torch.float32), ("tiny_gqa", torch.bfloat16)])
def test_block_activations_match_saved_tensors(name, dtype):
    cfg = preset(name)
    block = TransformerBlock(0, cfg, TensorParallel())
    for p in block.parameters():  # as training casts: parameters only, buffers stay fp32
        p.data = p.data.to(dtype)
    x = torch.randn(2, 64, cfg.dim, dtype=dtype, requires_grad=True)
    weights = {t.untyped_storage().data_ptr() for t in (*block.parameters(), *block.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    element = 4 if dtype == torch.float32 else 2
    assert sum(saved.values()) == planner.block_activation_bytes(
        cfg, tokens=128, seq_len=64, tp=1, sequence_parallel=False, element=element)


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages created inside the mode and still alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: set[int] = set()
        self.now = self.peak = 0

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if key in self.live or not size:
            return
        self.live.add(key)
        self.now += size
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._drop, key, size)

    def _drop(self, key: int, size: int) -> None:
        self.live.discard(key)
        self.now -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._add, out)
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1 << 25, 16 * 1000])  # one chunk / four chunks of 16 rows
def test_logits_bytes_cover_cross_entropy_peak(dtype, chunk, monkeypatch):
    monkeypatch.setattr(cross_entropy, "CHUNK_ELEMENTS", chunk)
    vocab, tokens, width = 1000, 64, 8
    cfg = preset("tiny", vocab_size=vocab)
    h = torch.randn(tokens, width, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, width, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    with LiveBytes() as live:  # head matmul + loss, forward and backward
        loss = cross_entropy.vocab_parallel_cross_entropy(h @ w.t(), labels, None, vocab)
        loss.backward()
    element = 4 if dtype == torch.float32 else 2
    measured = live.peak - 2 * w.numel() * element  # minus the small head/input gradients
    est = planner.logits_bytes(cfg, tokens=tokens, tp=1, element=element, pipeline=False)
    assert measured <= est <= 1.1 * measured


# ---- bubble, sequence parallelism, checkpointing, pipeline depth ------------------------------
def test_bubble_fraction():
    assert planner.bubble_fraction(1, 7) == 0
    assert planner.bubble_fraction(8, 128) == pytest.approx(7 / 135)
    r = planner.estimate(preset("llama2_70b"), planner.Layout(tp=8, pp=8, dp=8), seq_len=4096,
                      global_batch=1024)
    assert r.gas == 128 and r.bubble == pytest.approx(7 / (128 + 8 - 1))


def test_sequence_parallel_splits_the_norm_region_and_the_linear_inputs_over_tp():
    cfg, tokens, tp = preset("llama2_7b"), 4096, 8
    full, split = (planner.block_activation_bytes(cfg, tokens=tokens, seq_len=tokens, tp=tp,
                                               sequence_parallel=sp, element=2)
                   for sp in (False, True))
    # the two RMSNorms keep an fp32 input, a bf16 output and an fp32 rsqrt per token, and the
    # column-parallel groups (wq/wk/wv, w1/w3) their bf16 input: all sequence-split under SP
    # (the linears re-gather theirs in backward: megallama/parallel/sequence_linears.py)
    norms = 2 * (4 + 2) * tokens * 4096 + 2 * 4 * tokens
    inputs = 2 * 2 * tokens * 4096
    assert full - split == norms - norms // tp + inputs - inputs // tp
    lay = planner.Layout(tp=8, pp=1, dp=1)
    on, off = (planner.estimate(cfg, lay, seq_len=4096, global_batch=8, sequence_parallel=sp)
               for sp in (True, False))
    assert on.activations < off.activations and on.sequence_parallel


def test_checkpointing_keeps_only_block_inputs():
    cfg, lay = preset("llama2_7b"), planner.Layout(tp=1, pp=1, dp=8)
    full, ckpt = (planner.estimate(cfg, lay, seq_len=4096, global_batch=64,
                                activation_checkpointing=c) for c in (False, True))
    block = planner.block_activation_bytes(cfg, tokens=4096, seq_len=4096, tp=1,
                                        sequence_parallel=False, element=2)
    inputs = 32 * 2 * 4096 * 4096  # one bf16 [seq, dim] input per block
    assert full.activations - ckpt.activations == 32 * block - inputs - block  # + 1 recomputed
    assert ckpt.total < full.total


def test_more_pipeline_stages_hold_fewer_weights():
    cfg = preset("llama2_70b")
    weights = [planner.estimate(cfg, planner.Layout(8, pp, 512 // (8 * pp)), seq_len=4096,
                             global_batch=1024).weights for pp in (1, 2, 4, 8, 16)]
    assert weights == sorted(weights, reverse=True) and weights[0] > 12 * weights[-1]


def test_layouts_that_do_not_fit_are_flagged(capsys):
    r = planner.estimate(preset("llama2_70b"), planner.Layout(tp=8, pp=1, dp=1), seq_len=4096,
                      global_batch=8)
    assert not r.fits and r.total > 80 * GIB
    rc, out, _ = run(["model=llama2_70b", "gpus=8"], capsys)
    assert rc == 0 and "0 of" in out
    rows = [line for line in out.splitlines() if line.startswith(("yes", "NO"))]
    assert rows and all(line.startswith("NO") for line in rows)


# ---- command line ------------------------------------------------------------------------------
def test_cli_prints_table_and_writes_json(capsys, tmp_path):
    path = tmp_path / "plan.jsonl"
    rc, out, err = run(["model=llama2_7b", "gpus=8", "top=5", f"json={path}"], capsys)
    assert rc == 0, err
    lines = out.splitlines()
    assert "6.74B parameters" in lines[0] and "fits  tp  pp" in out
    rows = [line for line in lines if line.startswith(("yes", "NO"))]
    assert len(rows) == 5
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) > 5 and {"tp", "pp", "dp", "total", "fits", "bubble"} <= set(records[0])
    assert [r["fits"] for r in records] == sorted((r["fits"] for r in records), reverse=True)
    first = records[0]
    assert first["tp"] * first["pp"] * first["dp"] == 8


def test_cli_model_overrides_and_fp32_cpu(capsys):
    rc, out, err = run(["model=tiny", "model.n_layers=2", "gpus=2", "precision=fp32",
                        "device=cpu", "seq_len=64", "global_batch=4", "micro_batch=1",
                        "overhead_gib=0.5", "gpu_mem_gib=4"], capsys)
    assert rc == 0, err
    assert "2 layers" in out and "(cpu)" in out and "fp32" in out


@pytest.mark.parametrize("argv,message", [
    (["model=llama2_7b", "gpus=8", "tp=3"], "does not divide n_heads=32"),
    (["model=llama2_nope", "gpus=8"], "unknown model 'llama2_nope'"),
    (["model=llama2_7b", "gpus=12", "tp=8", "pp=1"], "no layout of gpus=12"),
    (["model=llama2_7b", "gpus=8", "colour=blue"], "unknown option 'colour'"),
    (["model=llama2_7b", "gpus=eight"], "gpus='eight': expected an integer"),
    (["model=llama2_7b", "gpus=8", "model.n_heds=4"], "unknown model field"),
    (["model=llama2_7b", "gpus=8", "zero_stage=4"], "zero_stage=4"),
    (["model=llama2_7b", "gpus=8", "pp=2", "zero_stage=2"], "ZeRO-2/3 with pipeline"),
    (["gpus=8"], "model=... and gpus=... are required"),
    (["model=tiny", "gpus=1", "seq_len=0"], "seq_len=0: must be >= 1"),
    (["model=tiny", "gpus=1", "global_batch=-4"], "global_batch=-4: must be >= 1"),
    (["model=tiny", "gpus=1", "gpu_mem_gib=-3"], "gpu_mem_gib=-3: must be > 0"),
    (["model=tiny", "gpus=1", "overhead_gib=nan"], "overhead_gib=nan: must be >= 0"),
    (["model=tiny", "gpus=2", "tp=0,2"], "tp=0,2: must be >= 1"),
    (["model=tiny", "gpus=1", "micro_batch=0"], "micro_batch=0: must be >= 1"),
    (["model=tiny", "gpus=1", "model.n_heads=0"], "n_heads=0: must be >= 1"),
    (["model=tiny", "gpus=1", "model.norm_eps=abc"], "norm_eps='abc': expected a number"),
    (["model=tiny", "gpus=1", "json=/nonexistent/dir/plan.jsonl"],
     "json=/nonexistent/dir/plan.jsonl: directory /nonexistent/dir does not exist"),
    (["model=tiny", "gpus=1", "json=/"], "json=/: a directory; name the file to write"),
    (["model=tiny", "gpus=1", "gpu_mem_gib=inf"], "gpu_mem_gib=inf: must be a finite number"),
    (["model=tiny", "gpus=1", "overhead_gib=inf"], "overhead_gib=inf: must be a finite number"),
    (["model=tiny", "gpus=2", "optim_impl=zero"], "optim_impl='zero': choose fused or distributed"),
    (["model=tiny", "gpus=2", "optim_impl=distributed", "zero_stage=1"],
     "optim_impl=distributed with zero_stage=1"),
    (["model=tiny", "gpus=1", "fp8=e4m3"], "fp8='e4m3': choose one of ['none', 'tensorwise'"),
    (["model=tiny", "gpus=1", "activation_checkpointing=some"],
     "activation_checkpointing='some': choose both, on, off, selective or all"),
    (["model=tiny", "gpus=1", "fp8=rowwise", "precision=fp32"],
     "fp8=rowwise needs precision=bf16 (as trainer.fp8 does), not fp32"),
])
def test_cli_errors_are_one_clear_line(argv, message, capsys):
    rc, out, err = run(argv, capsys)
    assert rc == 2 and message in err and err.count("\n") == 1 and not out


@pytest.mark.parametrize("content,message", [
    (b"[32, 4096]", "a JSON list, expected an object"),
    (b'{"dim": 4096, \xff}', "not UTF-8 text (byte 0xff at offset 14)"),
    (b'{"dim": 4096', "not valid JSON"),
    (b'{"hidden_size": 4096}', "missing field 'num_attention_heads'"),
    (b'{"dim": 4096, "vocab_size": "many"}', "vocab_size='many'"),
])
def test_cli_model_file_errors_name_the_file(content, message, capsys, tmp_path):
    params = tmp_path / "params.json"
    params.write_bytes(content)
    rc, out, err = run([f"model={params}", "gpus=1"], capsys)
    assert rc == 2 and err.startswith(f"megallama-plan: error: {params}") and message in err
    assert err.count("\n") == 1 and not out and params.read_bytes() == content


def test_estimate_rejects_what_the_trainer_rejects():
    cfg = preset("llama2_7b")
    with pytest.raises(ConfigError, match="not a multiple of micro_batch_size"):
        planner.estimate(cfg, planner.Layout(1, 1, 3), seq_len=4096, global_batch=1024)
    with pytest.raises(ConfigError, match="sequence_parallel"):
        planner.estimate(cfg, planner.Layout(8, 1, 1), seq_len=4100, global_batch=8,
                      sequence_parallel=True)
    with pytest.raises(ConfigError, match="precision"):
        planner.estimate(cfg, planner.Layout(1, 1, 1), seq_len=4096, global_batch=8, precision="fp16")


def test_load_model_from_meta_params_json(tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32,
                                "norm_eps": 1e-5, "vocab_size": -1}))
    with pytest.raises(ConfigError, match="model.vocab_size=32000"):
        plan.load_model(str(path))
    cfg = plan.load_model(str(path), {"vocab_size": 32000, "n_layers": 40})
    assert cfg.n_layers == 40 and cfg.ffn_hidden_dim == 11008
    assert plan.load_model(str(path), {"vocab_size": 32000}) == preset("llama2_7b")


def test_fused_optimizer_states():
    """zero_stage=0 (optim.impl=fused): bf16 weights and gradients, the master's int16 remainder
    (the bf16 weight is its upper half) and fp32 moments, all unsharded (14 bytes/param); an fp32
    gradient buffer once gradients are summed (gas or dp > 1)."""
    p = 1_000_000
    st = state_bytes.optimizer_states(p, 1, "bf16", 0, "cuda", gas=1)
    assert st.weights + st.grads_keep + st.grads_accum + st.master + st.adam == 14 * p
    summed = state_bytes.optimizer_states(p, 2, "bf16", 0, "cuda", gas=1)
    assert summed.grads_keep == 4 * p and summed.grads_accum == 0 and summed.adam == 8 * p
    assert summed.master == 2 * p
    fp32 = state_bytes.optimizer_states(p, 1, "fp32", 0, "cuda", gas=4)
    assert (fp32.weights, fp32.master, fp32.grads_accum) == (4 * p, 0, 4 * p)


def test_distributed_optimizer_states_by_hand():
    """optim.impl=distributed: bf16 weights and an fp32 gradient buffer for every parameter
    (which holds the reduced shard too: the reduce-scatter is in place), master remainder (2
    bytes) and moments (8) of a 1/dp shard only: 2 + 4 + (2 + 8) / dp bytes per parameter."""
    p = 8_000_000
    for dp, want in ((1, 16 * p), (2, 6 * p + 5 * p), (8, 6 * p + 10 * p // 8)):
        st = state_bytes.optimizer_states(p, dp, "bf16", 0, "cuda", gas=4, impl="distributed")
        assert st.weights + st.grads_keep + st.grads_accum + st.master + st.adam == want, dp
        assert st.step == 0 and st.bucket == 0
    fp32 = state_bytes.optimizer_states(p, 4, "fp32", 0, "cuda", impl="distributed")
    assert (fp32.weights, fp32.grads_keep, fp32.master, fp32.adam) == (4 * p, 4 * p, 0, 2 * p)
    gloo = state_bytes.optimizer_states(p, 4, "bf16", 0, "cpu", gas=4, impl="distributed")
    assert gloo.bucket == p and not gloo.bucket_early  # Gloo's staging shards, 4 bytes / dp
    # the fused optimizer keeps everything on every rank: 2 + 4 + 2 + 8 bytes/param at any dp
    fused = state_bytes.optimizer_states(p, 8, "bf16", 0, "cuda", gas=4)
    assert fused.weights + fused.grads_keep + fused.master + fused.adam == 16 * p


def _held_bytes(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> int:
    """Bytes of every distinct storage the parameters, their .grad and the optimizer reach
    (its state, buckets and shards, walked through containers and megallama's own objects)."""
    seen: set[int] = set()
    storages: dict[int, int] = {}

    def walk(x: object) -> None:
        if id(x) in seen:
            return
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            st = x.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, (list, tuple, set)):
            for v in x:
                walk(v)
        elif type(x).__module__.startswith("megallama.optim") and hasattr(x, "__dict__"):
            walk(vars(x))

    walk(params)
    walk([p.grad for p in params if p.grad is not None])
    walk(vars(opt))
    return sum(storages.values())


@pytest.mark.parametrize("impl", ["fused", "distributed"])
@pytest.mark.parametrize("gas", [1, 2])
def test_optimizer_bytes_per_param_match_what_the_optimizer_holds(impl, gas):
    """bf16 at dp = 1 after a backward: every byte the weights, gradients and optimizer hold,
    counted from the tensors themselves, equals the planner's model-state bytes (the fused
    optimizer's master is the bf16 weight plus an int16 remainder: 2 bytes, not 4)."""
    from megallama.optim.distributed_adamw import DistributedAdamW
    from megallama.optim.fused_adamw import MasterWeightAdamW
    from megallama.parallel.topology import Grid, build_topology

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 64, bias=False))
    model.to(torch.bfloat16)
    params = list(model.parameters())
    kw = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "max_grad_norm": 1.0,
          "topo": build_topology(Grid.from_world(1)), "gas": gas, "use_kernel": False}
    groups = [{"params": params, "weight_decay": 0.0}]
    opt = (MasterWeightAdamW(groups, **kw) if impl == "fused" else
           DistributedAdamW(groups, bucket_bytes=DIST_BUCKET_SMALL, registration_order=params,
                            **kw))
    model(torch.randn(4, 64, dtype=torch.bfloat16)).float().square().sum().backward()
    n = sum(p.numel() for p in params)
    want = state_bytes.optimizer_states(n, 1, "bf16", 0, "cpu", gas=gas, impl=impl)
    planned = want.weights + want.grads_keep + want.grads_accum + want.master + want.adam
    got = _held_bytes(opt, params)
    assert abs(got - planned) <= 0.01 * planned, (impl, gas, got / n, planned / n)


DIST_BUCKET_SMALL = 8192  # bytes: several buckets for the tiny model


def test_communication_bytes_per_step_by_hand():
    """Ring collectives: a reduce-scatter / all-gather of N bytes sends (dp-1)/dp N per rank, an
    all-reduce twice that. llama2_7b, tp=1 pp=2 dp=4, bf16, micro 1, global batch 64 (gas 16)."""
    cfg = preset("llama2_7b")
    lay = planner.Layout(1, 2, 4, 1)
    kw = {"seq_len": 4096, "global_batch": 64, "zero_stage": 0}
    dist_rows = planner.estimate_stages(cfg, lay, optim_impl="distributed", **kw)
    fused_rows = planner.estimate_stages(cfg, lay, **kw)
    for d, f in zip(dist_rows, fused_rows, strict=True):
        part = d.params * 3 // 4
        assert d.dp_comm == part * (4 + 2)  # fp32 reduce-scatter + bf16 all-gather
        assert f.dp_comm == 2 * part * 4  # fp32 all-reduce
        # one [1, 4096, 4096] bf16 activation out and one gradient back per micro-batch
        assert d.pp_comm == 16 * 4096 * 4096 * 2
    one = planner.estimate(cfg, planner.Layout(1, 1, 1, 1), optim_impl="distributed",
                           seq_len=4096, global_batch=64, zero_stage=0)
    assert one.dp_comm == 0 and one.pp_comm == 0
    # 7B on 8 GPUs at tp=1: the fused optimizer does not fit in 80 GiB, the distributed one does
    lay8 = planner.Layout(1, 1, 8, 1)
    kw8 = {"seq_len": 4096, "global_batch": 1024, "zero_stage": 0, "activation_checkpointing": True}
    assert not planner.estimate(cfg, lay8, **kw8).fits
    assert planner.estimate(cfg, lay8, optim_impl="distributed", **kw8).fits


def test_cli_plans_selective_recomputation(capsys, tmp_path):
    """activation_checkpointing=selective plans parallel.activation_checkpointing=selective (its
    own column value, "sel", and recompute in the JSON); all = off, selective and on; the
    selective row keeps less than no recomputation and more than full."""
    path = tmp_path / "plan.jsonl"
    base = ["model=llama2_7b", "gpus=8", "tp=2", "pp=1", "micro_batch=1", "sequence_parallel=off"]
    rc, out, err = run([*base, "activation_checkpointing=selective", f"json={path}"], capsys)
    rows = [line.split() for line in out.splitlines() if line.startswith(("yes", "NO"))]
    assert rc == 0 and not err and rows and all(r[6] == "sel" for r in rows), out
    assert {json.loads(x)["recompute"] for x in path.read_text().splitlines()} == {"selective"}
    rc, out, err = run([*base, "activation_checkpointing=all", f"json={path}"], capsys)
    acts = {r["recompute"]: r["activations"] for r in map(json.loads, path.read_text().splitlines())}
    assert rc == 0 and not err and acts["full"] < acts["selective"] < acts["none"], acts
    table = {line.split()[6] for line in out.splitlines() if line.startswith(("yes", "NO"))}
    assert table == {"off", "sel", "on"}, out


def test_cli_distributed_optimizer(capsys):
    rc, out, err = run(["model=llama2_7b", "gpus=8", "zero_stage=0", "optim_impl=distributed",
                        "tp=1", "pp=1", "top=0"], capsys)
    assert rc == 0 and not err and "optim.impl=distributed" in out and "DP-comm" in out


@pytest.mark.parametrize("extra,header", [
    ([], "bf16, optim.impl=auto (fused at dp = 1, distributed at dp > 1)"),  # the trainer's
    (["zero_stage=0"], "bf16, optim.impl=auto (fused at dp = 1, distributed at dp > 1)"),
    (["precision=fp32"], "fp32, ZeRO-1"),
    (["zero_stage=1"], "bf16, ZeRO-1"),
    (["optim_impl=fused"], "bf16, optim.impl=fused"),
])
def test_cli_plans_the_optimizer_the_trainer_picks(capsys, extra, header):
    rc, out, err = run(["model=llama2_7b", "gpus=8", "tp=1", "pp=1", "top=0", *extra], capsys)
    assert rc == 0 and not err and header in out, out.splitlines()[:2]


def test_auto_plans_fused_at_dp1_and_distributed_above():
    """optim.impl=auto (bf16, or zero_stage=0) is planned per layout as the trainer resolves it
    (config.validate.resolve_optimizer): the fused optimizer's rows at dp = 1, the distributed
    one's at dp > 1; fp32 plans DeepSpeed's ZeRO-1."""
    cfg = preset("llama2_7b")
    kw = {"seq_len": 4096, "global_batch": 64}
    for lay, impl in ((planner.Layout(2, 4, 1), "fused"), (planner.Layout(1, 1, 8), "distributed")):
        for zero in (None, 0):
            auto = planner.estimate_stages(cfg, lay, zero_stage=zero, optim_impl="auto", **kw)
            assert auto == planner.estimate_stages(cfg, lay, zero_stage=0, optim_impl=impl, **kw)
    lay = planner.Layout(1, 1, 8)
    fp32 = planner.estimate_stages(cfg, lay, precision="fp32", zero_stage=None, optim_impl="auto",
                                   **kw)
    assert fp32 == planner.estimate_stages(cfg, lay, precision="fp32", zero_stage=1, **kw)
    assert planner.resolved_optimizer("bf16", None, "auto", planner.Layout(2, 4, 1)) == (0, "fused")


# ---- FP8 linears (trainer.fp8) ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "tiny_gqa"])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_block_activations_match_saved_tensors(name, recipe):
    """What the FP8 matmul keeps (fp8 input copies and scales for tensorwise, the bf16 inputs for
    rowwise) against autograd's saved tensors of a bf16 block, as the bf16 formula is checked."""
    cfg = preset(name)
    block = TransformerBlock(0, cfg, TensorParallel())
    for p in block.parameters():
        p.data = p.data.to(torch.bfloat16)
    convert_to_float8(block, recipe, TensorParallel(), emulate=True)
    x = torch.randn(2, 64, cfg.dim, dtype=torch.bfloat16, requires_grad=True)
    weights = {t.untyped_storage().data_ptr() for t in (*block.parameters(), *block.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    est = planner.block_activation_bytes(cfg, tokens=128, seq_len=64, tp=1,
                                         sequence_parallel=False, element=2, fp8=recipe)
    plain = planner.block_activation_bytes(cfg, tokens=128, seq_len=64, tp=1,
                                           sequence_parallel=False, element=2)
    assert sum(saved.values()) == est
    # by hand (dim 128, FFN 352, 128 tokens): 5 fp8 inputs replace 2 bf16 ones, wo adds an fp8
    # copy of the 128-wide attention output, w2's fp8 input replaces the bf16 SwiGLU product
    assert est - plain == ((128 * (5 * 128 - 4 * 128 + 128 - 352) + 56) if recipe == "tensorwise"
                           else 0)


def test_fp8_estimate_adds_activations_and_cast_workspace(capsys):
    cfg, lay = preset("llama2_7b"), planner.Layout(tp=2, pp=1, dp=1)
    kw = dict(seq_len=4096, global_batch=8, sequence_parallel=True)
    plain, fp8 = (planner.estimate(cfg, lay, fp8=f, **kw) for f in ("none", "tensorwise"))
    tokens, h, f = 4096, 4096, 11008 // 2
    # under SP each column group keeps one fp8 copy of its sequence shard for its bf16 shard
    # and one fp32 input scale per group: 44 bytes of scales (7 weights, 2 groups, wo, w2)
    per_block = (2 - 4) * (tokens // 2) * h + tokens * h // 2 + (1 - 2) * tokens * f + 44
    cast = 9 * tokens * f  # the largest operand cast: w2's input [T, f/t] (and w1/w3's gradients)
    assert fp8.activations - plain.activations == 32 * per_block + cast
    assert (fp8.weights, fp8.gradients, fp8.master, fp8.optimizer) == \
        (plain.weights, plain.gradients, plain.master, plain.optimizer)
    rc, out, _ = run(["model=llama2_7b", "gpus=2", "tp=2", "pp=1", "fp8=tensorwise"], capsys)
    assert rc == 0 and "bf16, fp8 tensorwise" in out


# ---- ranking (megallama.training.plan_ranking, docs/PLANNER.md "Ranking") -----------------------
def test_ranking_by_hand():
    """tiny (dim 128, 4 layers, 8 heads of 16, FFN 352, vocab 32000), seq 64, 8 sequences per
    step on 4 GPUs, tp and pp in {1, 2}: the order follows extra compute, then exposed bytes."""
    cfg = preset("tiny")
    useful = 6 * (cfg.num_parameters() - 32000 * 128) + 12 * 4 * 128 * 64  # flops_per_token
    assert useful == 29_793_024
    core = 4 * 128 * 64  # q k^T and p v per token per block, forward
    block = 2 * (4 * 128 * 128 + 3 * 128 * 352) + core  # a block's forward per token
    sel, full = 4 * core / useful, 4 * block / useful
    assert (round(sel, 4), round(full, 4)) == (0.0044, 0.0583)
    rows = planner.plan(cfg, 4, seq_len=64, global_batch=8, tp=[1, 2], pp=[1, 2],
                        micro_batch=[1], zero_stage=None, optim_impl="auto")  # as the CLI
    key = [(r.layout.tp, r.layout.pp, r.recompute, r.sequence_parallel) for r in rows]
    # pp = 2 idles 1/(m + 1) of the step: m = 4 at (1, 2, 2), m = 8 at (2, 2, 1)
    assert key[:6] == [(2, 1, "none", True), (2, 1, "none", False), (1, 1, "none", False),
                       (2, 1, "selective", True), (2, 1, "selective", False),
                       (1, 1, "selective", False)]
    assert [r.extra_compute for r in rows[:6]] == pytest.approx([0, 0, 0, sel, sel, sel])
    assert rows[6].extra_compute == pytest.approx(full)
    assert [(r.layout.pp, r.extra_compute) for r in rows[-3:]] == \
        [(2, pytest.approx(1.25 * (1 + x) - 1)) for x in (0, sel, full)]
    # extra 0 at (2,1,2) and (1,1,4): exposed bytes decide. (2,1,2): TP all-reduces of
    # [64, 128] bf16 (a unit = (t-1)/t of it, 8192 B; an all-reduce 2 units), 4 per block +
    # embedding + head = 36 units per micro-batch, 4 micro-batches; under SP the same volume
    # forward, plus 2 re-gathers of the saved shard per block in backward (sent), and those and
    # the 2 input-gradient reduce-scatters of the column groups hide behind gemms (not exposed).
    # Its 4,498,560 parameters fit one 25 MiB fp32 bucket, reduce-scattered after backward and
    # gathered before the first layer: 6 bytes x half. (1,1,4): only the embedding's bucket
    # (32000 x 128), 6 bytes x 3/4.
    unit, dp_tp2 = 2 * 64 * 128 // 2, 6 * 4_498_560 // 2
    assert (rows[0].tp_comm, rows[1].tp_comm) == (4 * (36 + 8) * unit, 4 * 36 * unit)
    assert (rows[0].exposed_comm, rows[1].exposed_comm) == \
        (4 * (36 - 8) * unit + dp_tp2, 4 * 36 * unit + dp_tp2) == (14_413_184, 14_675_328)
    assert rows[2].exposed_comm == 6 * 32000 * 128 * 3 // 4 == 18_432_000
    assert rows[0].total < rows[1].total  # SP: also less memory


def test_cli_prints_the_ranking_criterion(capsys):
    rc, out, err = run(["model=llama2_7b", "gpus=8", "top=3"], capsys)
    assert rc == 0 and not err and "ranked by: 1. extra compute time" in out
    first = out.splitlines()[6].split()
    # the layout experiment=llama2_7b_pretrain ships: tp 1 x dp 8, nothing recomputed
    assert first[:8] == ["yes", "1", "1", "8", "1", "128", "off", "off"], out


def _planned_presets() -> dict[str, list[str]]:
    """experiment name -> the megallama-plan arguments its YAML comment quotes."""
    out = {}
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        lines = [x for x in path.read_text().splitlines() if x.startswith("#   megallama-plan ")]
        if lines:
            out[path.stem] = lines[0].split()[2:]
    return out


PRESET_DIR = Path(__file__).resolve().parents[1] / "conf" / "experiment"


def test_every_gpu_preset_is_the_planners_first_choice(capsys, tmp_path):
    """Each GPU experiment preset quotes the megallama-plan command of its model, sequence and
    batch; the planner's best-ranked layout for it (tp, pp, micro-batch, recomputation, SP) is
    the preset's. A planner change that moves the best layout fails here until the preset (and
    its comment) follows."""
    from megallama.config.compose import load_config

    planned = _planned_presets()
    gpu = {p.stem for p in PRESET_DIR.glob("*.yaml") if "device: cuda" in p.read_text()}
    assert gpu == set(planned) and {"llama2_7b_pretrain", "llama2_7b_sft",
                                    "llama2_70b_pretrain", "llama3_1_8b_pretrain"} <= gpu, planned
    for name, argv in planned.items():
        cfg = load_config([f"experiment={name}"])
        opts = dict(a.split("=", 1) for a in argv)
        assert plan.load_model(opts["model"]) == cfg.model, name
        assert int(opts["seq_len"]) == cfg.data.seq_len, name
        assert int(opts["global_batch"]) == cfg.parallel.global_batch_size, name
        assert cfg.trainer.precision == opts.get("precision", "bf16"), name
        out = tmp_path / f"{name}.jsonl"
        assert run([*argv, "top=1", f"json={out}"], capsys)[0] == 0
        best = json.loads(out.read_text().splitlines()[0])
        par = cfg.parallel
        want = {"tp": par.tp, "pp": par.pp, "micro_batch": par.micro_batch_size,
                "recompute": par.activation_checkpointing, "sequence_parallel":
                par.sequence_parallel, "fits": True}
        assert {k: best[k] for k in want} == want, name


def test_tp_comm_counts_sp_regathers_sent_not_exposed():
    """Under SP the column linears re-gather their saved shard in backward (2 all-gathers per
    block, fp8 bytes under FP8 tensorwise) behind the grad-input gemms and reduce-scatter the
    input gradient behind the grad-weight gemms: sent, not exposed. FP8 tensorwise also
    all-gathers the fp8 cast of the shard in forward (2 per block, 2 more when full recomputation
    re-runs the forward): 1 byte per element, sent and exposed. llama2_7b, tp 2, one stage."""
    cfg, lay = preset("llama2_7b"), planner.Layout(tp=2, pp=1, dp=1)
    kw = {"seq_len": 4096, "global_batch": 4, "zero_stage": 0}
    off, on, fp8 = (planner.estimate(cfg, lay, sequence_parallel=sp, fp8=f, **kw)
                    for sp, f in ((False, "none"), (True, "none"), (True, "tensorwise")))
    unit = 2 * 4096 * 4096 // 2  # (t-1)/t of a [4096, 4096] bf16 activation
    assert off.tp_comm == off.exposed_comm == 4 * (8 * 32 + 4) * unit
    assert on.tp_comm == off.tp_comm + 4 * 2 * 32 * unit
    assert on.exposed_comm == 4 * (6 * 32 + 4) * unit
    half = 4 * 2 * 32 * unit // 2  # 2 gathers per block of 32, 4 micro-batches, at 1 byte
    assert fp8.tp_comm == on.tp_comm - half - half  # 1-byte re-gathers and forward gathers
    assert fp8.exposed_comm == on.exposed_comm - half  # the forward gathers block
    # full recomputation: its re-run forward gathers fp8 too
    on_full, fp8_full = (planner.estimate(cfg, lay, sequence_parallel=True, fp8=f,
                                          activation_checkpointing="full", **kw)
                          for f in ("none", "tensorwise"))
    assert on_full.tp_comm == on.tp_comm + 4 * 4 * 32 * unit
    assert fp8_full.tp_comm == on_full.tp_comm - 3 * half
    assert fp8_full.exposed_comm == on_full.exposed_comm - 2 * half
    # rowwise gathers the bf16 shard both ways
    rowwise = planner.estimate(cfg, lay, sequence_parallel=True, fp8="rowwise", **kw)
    assert (rowwise.tp_comm, rowwise.exposed_comm) == (on.tp_comm, on.exposed_comm)


def test_tied_model_at_pp2_plans_the_last_stages_copy_and_its_gradient_sum():
    """Tied embeddings at pp > 1: the last stage holds a copy of the table (weights, gradients,
    optimizer state) and the two stages sum its gradient every step (PP-comm). tiny_llama3_tied
    (dim 64, vocabulary 128,256, 2 blocks of 49,280) at tp 1 x pp 2 x dp 2, 4 micro-batches of 64
    tokens, the distributed optimizer: the DP-reduced fp32 shard, 4 x table / 2, each way."""
    cfg = preset("tiny_llama3_tied")
    table, block = 128_256 * 64, 49_280
    first, last = planner.estimate_stages(cfg, planner.Layout(1, 2, 2), seq_len=64, global_batch=8,
                                          zero_stage=None, optim_impl="auto")
    assert (first.params, last.params) == (table + block, block + 64 + table)
    assert last.weights == 2 * last.params and last.optimizer == 8 * last.params // 2
    sends = 4 * 64 * 64 * 2  # one [64, 64] bf16 activation (or its gradient) per micro-batch
    assert first.pp_comm == last.pp_comm == sends + 4 * table // 2
    # one stage (pp 1): no copy, no sum; the head's fresh gradient is the table's (bf16)
    one = planner.estimate_stages(cfg, planner.Layout(1, 1, 4), seq_len=64, global_batch=8,
                                  zero_stage=None, optim_impl="auto")[0]
    assert one.params == table + 2 * block + 64 and one.pp_comm == 0
    assert one.gradients == 4 * one.params + 2 * table  # fp32 buffer + the fresh table gradient
    # DeepSpeed's ZeRO-1 sums an fp32 gradient (bf16: BF16_Optimizer's _hp_grad), the whole table
    ds = planner.estimate_stages(cfg, planner.Layout(1, 2, 2), seq_len=64, global_batch=8,
                                 zero_stage=1)
    assert [r.pp_comm for r in ds] == [sends + 4 * table] * 2
