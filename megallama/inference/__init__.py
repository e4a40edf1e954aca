"""Inference: the model loader without optimizer or DeepSpeed (:mod:`.loader`), KV-cache
generation (:mod:`.generation`) and evaluation (:mod:`.evaluation`), at any (tp, pp); pipeline
stages exchange activations and keep their own KV cache (:mod:`.stages`)."""
