"""Optimizers: parameter groups and the LR schedule (:mod:`.schedule`), megallama's fused
master-weight AdamW (:mod:`.fused_adamw`) and its kernels (:mod:`.adamw_kernel`)."""
