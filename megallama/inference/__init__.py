"""Inference: the model loader without optimizer or DeepSpeed (:mod:`.loader`), KV-cache
generation (:mod:`.generation`) and evaluation (:mod:`.evaluation`)."""
