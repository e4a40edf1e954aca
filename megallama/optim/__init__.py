"""Optimizers: parameter groups and the LR schedule (:mod:`.schedule`), megallama's fused
master-weight AdamW (:mod:`.fused_adamw`), its DP-sharded form (:mod:`.distributed_adamw`), their
kernels (:mod:`.adamw_kernel`) and the rule that picks the Triton or torch path (:mod:`.kernels`)."""
