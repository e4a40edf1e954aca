#!/usr/bin/env bash
# The README's main job: on a fresh machine, set up, train the demo tokenizer, preprocess the
# shipped State of the Union corpus, and train a tiny Llama with TP=2 x PP=2 (4 CPU ranks, gloo).
# Extra arguments are Hydra overrides for the training run, e.g. `trainer.steps=100`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh"
cd "$root"
py="$root/.venv/bin/python"
data=runs/demo/data
mkdir -p "$data"
export OMP_NUM_THREADS=1
if [ ! -f "$data/tokenizer.model" ]; then
  echo "[demo] training the demo tokenizer (8000 pieces, Llama 2 settings)"
  "$py" -m megallama.data.tokenizer_trainer --vocab-size 8000 --output-prefix "$data/tokenizer" \
    data/sotu/train.txt.gz
fi
for split in train val; do
  if [ ! -f "$data/sotu_$split.idx" ]; then
    echo "[demo] preprocessing data/sotu/$split.txt.gz"
    "$py" -m megallama.data.preprocess --tokenizer "$data/tokenizer.model" --workers 2 \
      --output-prefix "$data/sotu_$split" "data/sotu/$split.txt.gz"
  fi
done
baseline=$("$py" tools/unigram_baseline.py "$data/sotu_train" "$data/sotu_val")
echo "[demo] unigram baseline on the validation split: $baseline (the model must go well below it)"
echo "[demo] training: 4 ranks (tp=2 x pp=2), gloo on CPU"
start=$(date +%s)
"$root/.venv/bin/torchrun" --standalone --nproc-per-node 4 -m megallama.train experiment=tiny_cpu "$@"
echo "[demo] training took $(( $(date +%s) - start )) s; outputs in runs/demo/train"
echo "[demo] a sample from the freshly trained model (KV-cache decoding, top-p 0.9):"
"$py" -m megallama.generate --checkpoint runs/demo/train \
  --prompt "Mr. Speaker, the state of the Union is" \
  --temperature 0.7 --top-p 0.9 --seed 0 --max-new-tokens 40
