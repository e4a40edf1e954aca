#!/usr/bin/env bash
# The fine-tuning workflow on CPU, end to end, in a few minutes (after the demo model exists):
#   1. the demo model (launch/demo.sh trains it when runs/demo/train has no checkpoint) is exported
#      to Hugging Face and converted back with megallama-reshard -- the path a real Llama 2 (Meta or
#      HF weights) takes into a fine-tuning run;
#   2. the shipped instruction set data/instruct_demo (answers follow a rule the prompts never
#      state) is tokenized in Meta's chat format with the prompts masked from the loss;
#   3. fine-tuning with experiment=tiny_sft_cpu on 4 gloo ranks (tp=2 x pp=2): weights from step 1,
#      a fresh optimizer, dialogs packed whole with attention restarting per dialog;
#   4. the result is exported to HF and answers held-out prompts with the chat format (greedy);
#      their exact-match accuracy shows whether the rule was learned.
# Extra arguments are Hydra overrides for the fine-tuning run. runs/sft is rebuilt on every call.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh"
cd "$root"
py="$root/.venv/bin/python"
export OMP_NUM_THREADS=1
tok=runs/demo/data/tokenizer.model
if [ ! -e runs/demo/train/checkpoints/latest ] || [ ! -f "$tok" ]; then
  echo "[finetune] no demo model yet: training it first (launch/demo.sh)"
  bash launch/demo.sh
fi
rm -rf runs/sft
mkdir -p runs/sft/data
echo "[finetune] 1. demo model -> Hugging Face -> megallama (the path of Meta/HF Llama 2 weights)"
"$py" -m megallama.reshard --src megallama:runs/demo/train --dst hf:runs/sft/base-hf --tokenizer "$tok"
"$py" -m megallama.reshard --src hf:runs/sft/base-hf --dst megallama:runs/sft/base --tp 2 --pp 2 \
  --tokenizer "$tok"
echo "[finetune] 2. tokenizing data/instruct_demo in the Llama 2 chat format (prompts masked)"
for split in train valid; do
  "$py" -m megallama.data.preprocess "data/instruct_demo/$split.jsonl" --tokenizer "$tok" \
    --output-prefix "runs/sft/data/$split" --max-tokens 129 --quiet > /dev/null
done
echo "[finetune] the base model on held-out prompts, before fine-tuning:"
"$py" tools/chat_accuracy.py --checkpoint runs/sft/base-hf --format hf \
  --data data/instruct_demo/valid.jsonl --limit 100 --show 1
echo "[finetune] 3. fine-tuning: 4 ranks (tp=2 x pp=2), loss on the answers only; step 0's valid loss"
echo "           is the base model's masked loss on the held-out dialogs (trainer.eval_at_start)"
start=$(date +%s)
"$root/.venv/bin/torchrun" --standalone --nproc-per-node 4 -m megallama.train \
  experiment=tiny_sft_cpu trainer.init_from=runs/sft/base "$@"
echo "[finetune] fine-tuning took $(( $(date +%s) - start )) s; outputs in runs/sft/train"
echo "[finetune] 4. export to Hugging Face and answer held-out prompts (greedy, chat format)"
"$py" -m megallama.reshard --src megallama:runs/sft/train --dst hf:runs/sft/hf --tokenizer "$tok"
"$py" tools/chat_accuracy.py --checkpoint runs/sft/hf --format hf \
  --data data/instruct_demo/valid.jsonl --limit 100 --show 3
"$py" -m megallama.generate --checkpoint runs/sft/hf --format hf --chat \
  --prompt "Words: peace world nation" --max-new-tokens 12
