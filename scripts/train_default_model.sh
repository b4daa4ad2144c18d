#!/usr/bin/env bash
# The default CT model's recipe (model/README.md), one command, resumable: re-run it to continue a run folder.
#   bash scripts/train_default_model.sh [OUT]             (OUT defaults to runs/recipe; the model is OUT/pseudo_ct/model)
#   bash scripts/train_default_model.sh --baseline [OUT]  (its same-budget baseline; OUT defaults to runs/baseline_recipe)
#   bash scripts/train_default_model.sh OUT -- FLAGS...   (FLAGS go to both stages' `progidiff.train` after the recipe's
#                                                          and win over them, e.g. `-- --device cuda --threads 16`)
# Stage 1 trains from scratch on the phantoms and every real CT voxel (the held-out block aside). Stage 2 goes on
# from its model for 1500 whole-model steps with a second real anatomy added: the labelled MR rendered as CT
# (`progidiff.pseudo_ct`; its held-out slices, those the MR adapter is scored on, never rendered), and with fat
# between the pancreas' lobules in the phantoms and renderings (`--pancreas-fat`: the real gland reads near 0 HU).
# Why two stages: the pseudo-CT lifts the real block's pancreas as the last steps on a trained model, not from
# step 0.
# The time budgets (60 + 18 min of training, plus about 9 of data generation and final validation) keep the whole
# within 90 minutes on 2 cores (72 min on 2026-12-06, where both stages ended by their steps; about 87 on a day as
# slow as 2026-12-07, whose run with stage 1's former 64 minutes took 91).
# --baseline trains the deterministic MONAI UNet through the same two stages on the same data: the same-budget
# baseline. Its budget is the steps it made on 2 cores in the training minutes the diffusion model's stages took
# there (16191 in 52.0 and 3729 in 14.5, 2026-12-06: the committed baseline), so that a faster machine or a GPU
# makes the same baseline instead of a longer-trained one; on a slower day the minutes end it first, as they do
# the diffusion model's stages.
set -euo pipefail
cd "$(dirname "$0")/.."
baseline=false
if [[ ${1:-} == --baseline ]]; then baseline=true; shift; fi
out_arg=
if [[ $# -gt 0 && $1 != -- ]]; then out_arg=$1; shift; fi
extra=()
if [[ ${1:-} == -- ]]; then shift; extra=("$@"); elif [[ $# -gt 0 ]]; then
  echo "usage: $0 [--baseline] [OUT] [-- PROGIDIFF_TRAIN_FLAGS...]; unexpected: $*" >&2; exit 2
fi
bash scripts/install.sh
data=../shared/data
common=(--phantoms 150 --volume "$data/ct_a_full/image.nii.gz" "$data/ct_a_full/label.nii.gz" total
        --hold-out 92:100 --real-weight 0.4 --contrast-rate 0.6 --balanced-anatomy --threads 2)
pseudo_ct=(--pseudo-ct "$data/mr_a/image.nii.gz" "$data/mr_a/label.nii.gz" total_mr --pseudo-ct-hold-out 5:10,15:20
           --pseudo-ct-weight 0.2 --pancreas-fat 0.5)
val_organs=(--val-organs liver,spleen,kidney_left,kidney_right,stomach,pancreas,aorta,inferior_vena_cava)
if $baseline; then
  out=${out_arg:-runs/baseline_recipe}
  stage1=(--baseline --max-steps 16191 --max-minutes 52 --val-every 2000 "${val_organs[@]}")
  stage2=(--baseline --max-steps 3729 --max-minutes 14.5 --val-every 100000)
else
  out=${out_arg:-runs/recipe}
  stage1=(--context-slices 1 --encoder-steps 6000 --max-steps 9000 --max-minutes 60 --encoder-minutes 30
          --val-every 3000 "${val_organs[@]}")
  stage2=(--encoder-steps 0 --max-steps 1500 --max-minutes 18 --val-every 100000)
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# A stage is done when its train record is written (the last thing a run writes).
if [[ ! -f $out/base/train_record.json ]]; then
  .venv/bin/python -m progidiff.train --out "$out/base" "${common[@]}" "${stage1[@]}" "${extra[@]}"
fi
if [[ ! -f $out/pseudo_ct/train_record.json ]]; then
  .venv/bin/python -m progidiff.train --out "$out/pseudo_ct" --init-from "$out/base/model" "${common[@]}" \
    "${pseudo_ct[@]}" "${stage2[@]}" "${extra[@]}"
fi
if $baseline; then
  echo "baseline: $out/pseudo_ct/model   (compare against it: bench/default_model.py --baseline $out/pseudo_ct/model)"
else
  echo "model: $out/pseudo_ct/model   (serve it: .venv/bin/python -m progidiff.promote $out/pseudo_ct/model model/progidiff_ct)"
fi
