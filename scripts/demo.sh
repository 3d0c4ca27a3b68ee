#!/usr/bin/env bash
# The main job on an embedded default, offline: prep -> sft -> align (TR-DPO) -> generate -> judge
# on a tiny Pythia-shaped model built locally. Smoke scale: the numbers mean nothing.
set -euo pipefail
D=${DEMO_DIR:-.demo}
rm -rf "$D" && mkdir -p "$D"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

trcli tiny "$D/model" --sample "$D/pairs.jsonl"
trcli tiny "$D/reward-model" --reward --seed 1
trcli prep --source jsonl --input "$D/pairs.jsonl" --test-size 0.25 -o "$D/prep"
trcli sft --model "$D/model" --from "$D/prep" --max-steps 40 --batch-size 8 --lr 1e-2 -o "$D/sft"
trcli align --from "$D/sft" --method dpo --max-steps 20 --batch-size 4 --lr 5e-3 -o "$D/dpo"
trcli align --from "$D/sft" --method tr-dpo --update soft --alpha 0.6 --tau 1 \
  --max-steps 20 --batch-size 4 --lr 5e-3 -o "$D/tr-dpo"
for m in dpo tr-dpo; do
  trcli generate --from "$D/$m" --prompts "$D/prep" --max-new-tokens 24 --score-with "$D/sft" -o "$D/$m.jsonl"
done
trcli judge --candidate "$D/tr-dpo.jsonl" --baseline "$D/dpo.jsonl" --judge "rm:$D/reward-model" -o "$D/judge"
echo "Smoke-scale demo: a tiny random model, a random reward model and 64 synthetic pairs." >&2
echo "The win rate above shows the pipeline works end to end; it says nothing about TR-DPO." >&2
