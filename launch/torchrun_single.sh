#!/usr/bin/env bash
# One node, all its GPUs (or N CPU ranks): torchrun_single.sh [NPROC] [HYDRA OVERRIDES...]
#   bash launch/torchrun_single.sh 8 model=llama2_7b parallel.tp=2 parallel.pp=4 trainer.precision=bf16
set -euo pipefail
nproc="${1:-$(python3 -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
shift || true
exec torchrun --standalone --nproc-per-node "$nproc" -m megallama.train "$@"
