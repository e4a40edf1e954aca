"""A Llama-3-shaped model the whole way, each step through the command a user runs: Meta's
consolidated files (written by megallama's Meta writer from a seeded model, with Meta's tiktoken
``tokenizer.model``) -> ``megallama-reshard`` to megallama at tp 2 -> ``megallama-preprocess`` of
chat JSONL in Llama 3's format (prompts masked) -> fine-tuning under torchrun at tp 2 from those
weights -> ``megallama-reshard`` to HF -> transformers' greedy ``generate`` on the export gives the
tokens megallama's ``generate`` gives on the fine-tuned checkpoint (and the answer it was taught),
and its logits over 300 positions equal megallama's (an export without Llama 3.1's RoPE scaling
leaves short greedy outputs unchanged but moves these logits by 0.2; 3e-6 when right).

Tiny widths and two layers; the 128,256-id vocabulary is Llama 3's, so the embedding and head are
most of the model (16.4M of its 16.5M parameters) and of the run's time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megallama.config import preset
from megallama.data.indexed import IndexedTokens
from megallama.data.preprocess import main as preprocess_main
from megallama.data.tokenizer import Tokenizer
from megallama.inference.generation import chat_prompt, generate
from megallama.inference.loader import load_for_inference
from megallama.interop.meta import MetaSink
from megallama.model.llama import Transformer
from megallama.reshard import main as reshard_main
from tests.conftest import require_llama3_tokenizer, require_module
from tests.distributed.cli import read_scalars, torchrun

pytestmark = pytest.mark.slow

EOT = 128009  # <|eot_id|>
HEADER = (128006, 128007)  # <|start_header_id|>, <|end_header_id|>
# the dialog taught (four copies), and one never seen, whose continuation is whatever it is
QA = [("What is the capital of France?", "Paris.")] * 4
UNSEEN = "Name a prime number."
SYSTEM = "Answer in one word."
STEPS = 12


def reshard(src: str, dst: str, *extra: str) -> None:
    """``megallama-reshard`` (its entry point, in this process)."""
    assert reshard_main(["--src", src, "--dst", dst, "--no-progress", *extra]) == 0


def write_meta(path: Path, cfg, tokenizer: Path) -> dict[str, torch.Tensor]:
    """A seeded model's weights as Meta's consolidated.00.pth + params.json (megallama's MetaSink,
    the writer behind ``megallama-reshard --dst meta:``); returns the bf16 tensors written."""
    path.mkdir()
    state = {n: t.to(torch.bfloat16) for n, t in Transformer(cfg, seed=3).state_dict().items()}
    sink = MetaSink(path, cfg, torch.bfloat16, mp=1, tokenizer=tokenizer)
    for name, t in state.items():
        sink.write(name, t)
    sink.finish()
    return state


def chat_data(root: Path, tokenizer: Path, tok: Tokenizer) -> Path:
    """Chat JSONL preprocessed with the Llama 3 tokenizer; checks
    that exactly the answers and their <|eot_id|> carry the loss."""
    lines = [json.dumps({"messages": [{"role": "system", "content": SYSTEM},
                                      {"role": "user", "content": q},
                                      {"role": "assistant", "content": a}]})
             for q, a in QA]
    (root / "chat.jsonl").write_text("\n".join(lines) + "\n")
    prefix = root / "chat"
    assert preprocess_main(["--tokenizer", str(tokenizer), "--output-prefix", str(prefix),
                            str(root / "chat.jsonl")]) == 0  # megallama-preprocess
    data, start = IndexedTokens(prefix), 0
    assert data.loss_mask is not None and data.num_docs == len(lines)
    for i, (q, a) in enumerate(QA):
        doc = data.document(i).tolist()
        mask = data.loss_mask[start:start + len(doc)].astype(bool)
        start += len(doc)
        answer = tok.encode(a, bos=False, eos=False) + [EOT]
        assert doc[0] == tok.bos_id and doc.count(HEADER[0]) == 3 and doc[-len(answer):] == answer
        assert [t for t, m in zip(doc, mask, strict=True) if m] == answer  # prompt masked
        assert doc[:-len(answer)] == chat_prompt(tok, q, SYSTEM)  # generation's prompt format
    return prefix


def test_meta_to_finetuned_hf_generates_as_megallama(tmp_path):
    tok_path = require_llama3_tokenizer()
    transformers = require_module("transformers")
    tok = Tokenizer(tok_path)
    cfg = preset("tiny_llama3", n_layers=2)
    meta, mg, hf = tmp_path / "meta", tmp_path / "mg_tp2", tmp_path / "hf"
    state = write_meta(meta, cfg, tok_path)
    reshard(f"meta:{meta}", f"megallama:{mg}", "--tp", "2")
    prefix = chat_data(tmp_path, tok_path, tok)

    out = tmp_path / "sft"
    proc, _ = torchrun(2, "megallama.train", [
        # Meta's params.json has no context length: Llama 3.1's scaled RoPE implies 131072
        "model=tiny_llama3", "model.n_layers=2", "model.max_seq_len=131072", "parallel.tp=2",
        f"data.train=[{prefix}]", "data.valid=[]", f"data.tokenizer={tok_path}", "data.seq_len=64",
        "data.packing=documents", "parallel.micro_batch_size=2", "parallel.global_batch_size=2",
        "optim.lr=3e-2", "optim.warmup_steps=1", "optim.weight_decay=0.0",
        f"trainer.steps={STEPS}", "trainer.log_interval=1", "trainer.eval_interval=0",
        "trainer.device=cpu", f"trainer.output_dir={out}", f"trainer.init_from={mg}"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"initialised from the weights of {mg}" in proc.stdout
    losses = read_scalars(out / "tensorboard")["train/loss"]
    assert losses[-1] < losses[0] / 4, losses  # the answers were learnt
    step = out / "checkpoints" / f"step_{STEPS:08d}"
    reshard(f"megallama:{step}", f"hf:{hf}", "--tokenizer", str(tok_path))

    question, answer = QA[0]
    prompts = [chat_prompt(tok, question, SYSTEM), chat_prompt(tok, UNSEEN, SYSTEM)]
    tuned = load_for_inference(step, "megallama")  # fp32, tp 1 from the tp 2 checkpoint
    ours = generate(tuned, prompts, 6)
    taught = tok.encode(answer, bos=False, eos=False) + [EOT]
    assert ours[0][:len(taught)] == taught, tok.decode(ours[0])  # the answer, then the turn ends

    hf_model = transformers.LlamaForCausalLM.from_pretrained(
        hf, attn_implementation="eager").float().eval()
    assert not torch.equal(hf_model.model.embed_tokens.weight,
                           state["tok_embeddings.weight"].float())  # the fine-tuned weights
    hf_model.generation_config.eos_token_id = None  # the full length, as ours without stop ids
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf)  # the export's tokenizer.json
    for prompt, mine in zip(prompts, ours, strict=True):
        assert hf_tok.encode(tok.decode(prompt), add_special_tokens=False) == prompt
        with torch.no_grad():
            theirs = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(
                1, len(prompt), dtype=torch.long), max_new_tokens=6, do_sample=False,
                pad_token_id=tok.eos_id)[0, len(prompt):].tolist()
        assert mine == theirs, (hf_tok.decode(mine), hf_tok.decode(theirs))
    # logits over 300 positions, where the scaled RoPE's low-frequency bands turn measurably
    # (greedy tokens of short prompts hardly depend on them: 0.2 off without
    # the scaling in config.json, 3e-6 with it): transformers' equal megallama's
    text = tok.encode(" ".join([question, answer] * 30), bos=True)[:300]
    with torch.no_grad():
        want = tuned(torch.tensor([text]))[..., :cfg.vocab_size]
        got = hf_model(torch.tensor([text])).logits
    assert torch.allclose(got, want, rtol=0, atol=1e-4), (got - want).abs().max()
