#!/usr/bin/env bash
# bash paper_scripts/galore_table2.sh
# (GPU, the paper's size: MODEL=llama_60m DATA=c4 STEPS=10000 RANK=128 TRAINER=gpu bash paper_scripts/galore_table2.sh)
#
# A small, honest reproduction in the spirit of the GaLore paper's Table 2 (Zhao et al., 2024,
# "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection"): validation perplexity and
# optimizer-state memory of AdamW, GaLore and FRUGAL (Zmushko et al., 2024) pre-training the same
# LLaMA model on the same data for the same steps. The defaults (llama_tiny on the Python stdlib corpus,
# 200 steps) fit a 2-core CPU in a few minutes and are NOT the paper's setting; its numbers are not
# comparable to Table 2. Writes results/galore_table2/{table.md,plot.png} via galore_table2_report.py;
# each run's summary.json is under results/galore_table2/runs/<optimizer>/.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
MODEL=${MODEL:-llama_tiny}       # llama_60m | llama_130m | llama_350m | llama_1b on a GPU
DATA=${DATA:-stdlib}             # c4 needs the network
STEPS=${STEPS:-200}
RANK=${RANK:-32}                 # the paper: 128 (60m), 256 (130m, 350m), 512 (1b)
LR=${LR:-0.01}                   # the paper's GaLore lr; AdamW uses ADAMW_LR
ADAMW_LR=${ADAMW_LR:-0.001}
TRAINER=${TRAINER:-cpu}
OUT=${OUT:-results/galore_table2}
EXTRA=${EXTRA:-}                 # more Hydra overrides, e.g. "data.max_documents=30 data.vocab_size=512"

common=("model=$MODEL" "data=$DATA" "trainer=$TRAINER" "trainer.max_steps=$STEPS"
        "trainer.val_check_interval=$STEPS" "trainer.enable_progress_bar=false" "print_table=false")
# shellcheck disable=SC2206
extra=($EXTRA)

"$PYTHON" -m experiments.train "${common[@]}" optim=adamw "optim.lr=$ADAMW_LR" \
    "run_dir=$OUT/runs/adamw" "${extra[@]}"
"$PYTHON" -m experiments.train "${common[@]}" optim=galore "optim.lr=$LR" "optim.rank=$RANK" \
    optim.update_proj_gap=200 optim.scale=0.25 "run_dir=$OUT/runs/galore" "${extra[@]}"
"$PYTHON" -m experiments.train "${common[@]}" optim=frugal "optim.lr=$ADAMW_LR" \
    "run_dir=$OUT/runs/frugal" "${extra[@]}"

"$PYTHON" paper_scripts/galore_table2_report.py "$OUT"
