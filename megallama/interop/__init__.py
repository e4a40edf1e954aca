"""Foreign checkpoint formats: Meta's consolidated shards and Hugging Face's LlamaForCausalLM
directories, their name tables and RoPE permutation, and conversion between them and megallama's
own checkpoint (``megallama-reshard``). Above ``megallama.checkpoint``, which knows nothing of them."""
