"""GPU correctness check: megallama's fp32 logits against transformers' LlamaForCausalLM on the same
random weights (the approach of tests/test_hf_parity.py, on CUDA with TF32 off).

    python3 tools/gpu_parity.py            # Llama-2-7B widths, 2 layers, seq 1024, and tiny presets
"""

from __future__ import annotations

import json
import sys

import torch


def main() -> int:
    import transformers

    from megallama.config import preset
    from megallama.interop.names import meta_to_hf_state_dict
    from megallama.model.llama import Transformer

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = [("llama2_7b", dict(n_layers=2, vocab_size=32000), 1024),
             ("tiny_gqa", dict(vocab_size=512), 64)]
    worst = 0.0
    for name, over, seq in cases:
        cfg = preset(name, **over)
        model = Transformer(cfg, seed=11).eval()
        hf_cfg = transformers.LlamaConfig(**cfg.to_hf_config())
        hf_cfg._attn_implementation = "sdpa"
        hf = transformers.LlamaForCausalLM(hf_cfg).eval()
        hf.load_state_dict(meta_to_hf_state_dict(model.state_dict(), cfg), strict=False)
        model.to(device), hf.to(device)
        tokens = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
        tokens = tokens.to(device)
        with torch.no_grad():
            ours = model.full_logits(tokens)
            theirs = hf(tokens).logits
        err = ((ours - theirs).norm() / theirs.norm()).item()
        worst = max(worst, err)
        print(json.dumps({"case": name, "seq": seq, "device": str(device), "rel_err": err}), flush=True)
        del model, hf
    ok = worst < 1e-5
    print(f"fp32 logits parity: worst relative error {worst:.2e} ({'PASS' if ok else 'FAIL'} < 1e-5)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
