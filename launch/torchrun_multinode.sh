#!/usr/bin/env bash
# Several nodes: run this on every node with the same MASTER_ADDR (a host all nodes reach),
# NNODES and a shared RUN_ID; each node starts NPROC_PER_NODE ranks.
#   MASTER_ADDR=node0 NNODES=4 NPROC_PER_NODE=8 RUN_ID=llama70b \
#     bash launch/torchrun_multinode.sh experiment=llama2_7b_pretrain trainer.output_dir=/shared/runs/x
# trainer.output_dir must be on a filesystem every node sees (checkpoints are written by all ranks).
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host}"
: "${NNODES:?set NNODES}"
exec torchrun \
  --nnodes "$NNODES" \
  --nproc-per-node "${NPROC_PER_NODE:-8}" \
  --rdzv-backend c10d \
  --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" \
  --rdzv-id "${RUN_ID:-megallama}" \
  --max-restarts "${MAX_RESTARTS:-0}" \
  -m megallama.train "$@"
