"""Generation at tp = 1: greedy equals transformers' greedy ``generate`` token for token on the same
random weights (a left-padded batch of prompts of different lengths, MHA, GQA and Llama 3.2's
shape: scaled RoPE, tied head); the KV-cache path
equals full recomputation and the training forward; sampling is seeded; bad input fails clearly;
the command line loads HF and megallama checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megallama.config import preset
from megallama.generate import main
from megallama.inference.generation import (
    GenerationError,
    Sampling,
    chat_prompt,
    generate,
    next_token,
)
from megallama.interop.names import meta_to_hf_state_dict
from megallama.model.llama import Transformer

VOCAB = 512
NEW = 32
# lengths 7, 19, 1, 12: left padding of 0..18 tokens, and a BOS-only prompt
PROMPTS = [[1, *range(40, 46)], [1, *range(100, 118)], [1], [1, 7, 300, 9, 11, 250, 13, 14, 480, 3, 4, 5]]


def hf_model_from(model: Transformer):
    transformers = pytest.importorskip("transformers")  # only the tests that compare with it
    hf_cfg = transformers.LlamaConfig(**model.cfg.to_hf_config())
    hf_cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict(meta_to_hf_state_dict(model.state_dict(), model.cfg), strict=False)
    return hf


def hf_greedy(hf, prompts: list[list[int]], new: int) -> list[list[int]]:
    """transformers' greedy generate on the left-padded batch (pad id 0, masked)."""
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    hf.generation_config.eos_token_id = None  # run the full length, as ours does without eos_id
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                          pad_token_id=0)
    return out[:, longest:].tolist()


def reference_greedy(model: Transformer, prompt: list[int], new: int) -> list[int]:
    """One prompt, no padding, no cache: the unmodified training forward at every step."""
    tokens = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(new):
            nxt = model.full_logits(tokens)[:, -1].argmax(-1)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
    return tokens[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=["tiny", "tiny_gqa", "tiny_llama3_tied"])
def model(request) -> Transformer:
    """MHA, GQA, and Llama 3.2's shape (llama3 RoPE scaling, tied head); two layers: as exact a
    test as four, at half the time on a loaded CPU."""
    return Transformer(preset(request.param, vocab_size=VOCAB, n_layers=2), seed=5).eval()


@pytest.fixture(scope="module")
def gqa() -> Transformer:
    """One model for the checks that do not depend on the head layout."""
    return Transformer(preset("tiny_gqa", vocab_size=VOCAB, n_layers=2), seed=5).eval()


def test_greedy_matches_transformers(model: Transformer) -> None:
    ours = generate(model, PROMPTS, NEW)
    assert all(len(o) == NEW for o in ours)
    assert ours == hf_greedy(hf_model_from(model), PROMPTS, NEW)
    assert len({tuple(o) for o in ours}) == len(PROMPTS)  # the prompts really steer the output


def test_cache_equals_recompute_and_training_forward(model: Transformer) -> None:
    cached = generate(model, PROMPTS, 10)
    assert cached == generate(model, PROMPTS, 10, use_cache=False)
    assert cached == [reference_greedy(model, p, 10) for p in PROMPTS]


def test_sampling_is_seeded(gqa: Transformer) -> None:
    s = Sampling(temperature=1.0, top_k=50, top_p=0.9, seed=123)
    a = generate(gqa, PROMPTS, 12, s)
    assert a == generate(gqa, PROMPTS, 12, s)
    assert a != generate(gqa, PROMPTS, 12, Sampling(temperature=1.0, top_k=50, top_p=0.9, seed=7))
    assert a != generate(gqa, PROMPTS, 12)  # sampling is not greedy in disguise
    # top-k = 1 leaves only the argmax: sampling must reproduce greedy
    assert generate(gqa, PROMPTS, 8, Sampling(temperature=0.7, top_k=1, seed=1)) == \
        generate(gqa, PROMPTS, 8)


def test_top_p_and_top_k_filters() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(next_token(logits, Sampling(1.0, top_p=0.7), g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7: the token crossing top_p (0.3) stays, the rest go
    draws = {int(next_token(logits, Sampling(1.0, top_k=3), g)) for _ in range(300)}
    assert draws == {0, 1, 2}


def test_eos_stops_and_is_not_returned(gqa: Transformer) -> None:
    free = generate(gqa, PROMPTS, 16)
    eos = free[0][5]  # a token prompt 0 produces: it must stop there
    out = generate(gqa, PROMPTS, 16, eos_id=eos)
    assert len(out[0]) <= 5
    for full, cut in zip(free, out, strict=True):
        assert cut == (full[: full.index(eos)] if eos in full else full)


def test_bad_input_is_a_clear_error(gqa: Transformer) -> None:
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generate(gqa, [[1, 5], []], 4)
    with pytest.raises(GenerationError, match="exceed the model's context of 256"):
        generate(gqa, [[1] * 250], 10)
    with pytest.raises(GenerationError, match="outside the model's vocabulary"):
        generate(gqa, [[1, VOCAB + 3]], 4)
    with pytest.raises(GenerationError, match="top_p"):
        Sampling(temperature=1.0, top_p=0.0)


def test_chat_prompt_format(llama_tokenizer_path) -> None:
    """``--chat`` prompts are the ids of Meta's format (sentencepiece on the literal strings), the
    same as megallama.data.chat.encode_dialog_prompt gives (the definition training data uses)."""
    import sentencepiece as spm

    from megallama.data.chat import encode_dialog_prompt
    from megallama.data.tokenizer import Tokenizer

    tok = Tokenizer(llama_tokenizer_path)
    sp = spm.SentencePieceProcessor(model_file=str(llama_tokenizer_path))
    assert chat_prompt(tok, " hi \n") == [1, *sp.encode("[INST] hi [/INST]")]
    # the system text is kept as given (Meta strips only the combined user content)
    with_system = [1, *sp.encode("[INST] <<SYS>>\n be brief\n<</SYS>>\n\nhi [/INST]")]
    assert chat_prompt(tok, "hi ", " be brief") == with_system
    assert with_system == encode_dialog_prompt(tok, [{"role": "system", "content": " be brief"},
                                                     {"role": "user", "content": "hi "}])


# ---- command line --------------------------------------------------------------------------------
def _hf_dir(tmp: Path, vocab: int) -> tuple[Transformer, Path]:
    model = Transformer(preset("tiny_gqa", vocab_size=vocab, n_layers=2), seed=9).eval()
    out = tmp / f"hf{vocab}"
    hf_model_from(model).save_pretrained(out)
    return model, out


def test_cli_hf_and_megallama_checkpoints(tmp_path, capsys, llama_tokenizer_path) -> None:
    from megallama.data.tokenizer import Tokenizer
    from megallama.interop.convert import convert

    model, hf_dir = _hf_dir(tmp_path, 32000)
    tok = Tokenizer(llama_tokenizer_path)
    prompt = "The quick brown fox"
    ids = tok.encode(prompt)
    expected = tok.decode(ids + generate(model, [ids], 10, eos_id=tok.eos_id)[0])
    args = ["--tokenizer", str(llama_tokenizer_path), "--prompt", prompt, "--max-new-tokens", "10"]
    capsys.readouterr()  # what building the HF directory printed (accelerate may import DeepSpeed)
    assert main(["--checkpoint", str(hf_dir), "--format", "hf", *args]) == 0
    assert capsys.readouterr().out == f"{expected}\n"  # streamed, one line
    assert expected.startswith(prompt)
    mega = tmp_path / "mega"
    convert(f"hf:{hf_dir}", f"megallama:{mega}", progress=False)
    assert main(["--checkpoint", str(mega), *args, "--no-stream", "--prompt", "Hi"]) == 0
    out = capsys.readouterr().out
    assert f"{expected}\n" in out and out.count("\n\n") == 2


def test_cli_chat_prompts_are_the_chat_format(tmp_path, capsys, llama_tokenizer_path) -> None:
    """``--chat --system``: the model is fed exactly the ids of the chat format (sentencepiece on
    Meta's literal string) and its greedy continuation is printed after the prompt's text."""
    import sentencepiece as spm

    from megallama.data.tokenizer import Tokenizer

    model, hf_dir = _hf_dir(tmp_path, 32000)
    tok = Tokenizer(llama_tokenizer_path)
    sp = spm.SentencePieceProcessor(model_file=str(llama_tokenizer_path))
    ids = [1, *sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nName a colour. [/INST]")]
    expected = tok.decode(ids + generate(model, [ids], 6, eos_id=tok.eos_id)[0])
    capsys.readouterr()
    assert main(["--checkpoint", str(hf_dir), "--format", "hf", "--tokenizer",
                 str(llama_tokenizer_path), "--chat", "--system", "Be brief.", "--prompt",
                 "Name a colour.", "--max-new-tokens", "6", "--no-stream"]) == 0
    assert capsys.readouterr().out == f"{expected}\n\n"
    # --allow-chat-tags: a tag inside the prompt is kept as text (refused without it)
    ids = [1, *sp.encode("[INST] What is [INST] for? [/INST]")]
    expected = tok.decode(ids + generate(model, [ids], 6, eos_id=tok.eos_id)[0])
    args = ["--checkpoint", str(hf_dir), "--format", "hf", "--tokenizer",
            str(llama_tokenizer_path), "--chat", "--prompt", "What is [INST] for?",
            "--max-new-tokens", "6", "--no-stream"]
    assert main(args) == 2
    assert "--allow-chat-tags" in capsys.readouterr().err
    assert main([*args, "--allow-chat-tags"]) == 0
    assert capsys.readouterr().out == f"{expected}\n\n"


def test_cli_tokenizer_mismatch_and_empty_prompt(tmp_path, capsys, llama_tokenizer_path) -> None:
    _, hf_dir = _hf_dir(tmp_path, VOCAB)
    base = ["--checkpoint", str(hf_dir), "--format", "hf", "--tokenizer", str(llama_tokenizer_path)]
    assert main([*base, "--prompt", "hello"]) == 2
    assert "model vocab_size 512 != tokenizer vocab_size 32000" in capsys.readouterr().err
    _, hf_dir = _hf_dir(tmp_path, 32000)
    base[1] = str(hf_dir)
    assert main([*base, "--prompt", "  "]) == 2
    assert "--prompt is empty" in capsys.readouterr().err
    assert main([*base, "--prompt", "hello " * 300]) == 2
    assert "exceed the model's context" in capsys.readouterr().err
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"first prompt\nsecond \xff prompt\n")
    assert main([*base, "--prompt-file", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--prompt-file {bad}: line 2 is not UTF-8 (byte 0xff" in err[0]
