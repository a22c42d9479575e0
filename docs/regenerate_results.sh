#!/usr/bin/env bash
# Regenerates every figure of docs/results.md and of the README's results: the comparison with the baselines and
# the table of DC-CCL's variants, seeds 0, 1 and 2, on the quickstart's digits, on scikit-learn's digits and on the
# fleet of 20 devices (about 2.5 hours on 2 CPU cores), then beyond digits and on the fleets of 100 and 1,000 devices
# (about 4 hours more). Every run is kept under $RESULTS/ (re-running skips what is done). Run from the repository root
# with the project installed; RESULTS=/elsewhere keeps the runs outside the work tree.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=(0 1 2)
RESULTS=${RESULTS:-runs/results}
declare -A DATA=([quickstart]="--config configs/quickstart.yaml"
                 [digits8]="--config configs/quickstart.yaml --data configs/data/sklearn_digits.yaml --name digits8"
                 [fleet]="--config configs/fleet.yaml")
VARIANTS=configs/ablations/variants.yaml
# On the fleet (about three times the quickstart's time per run) only the variants of the rounds and the fusion.
declare -A ONLY=([quickstart]="" [digits8]="" [fleet]="--only paper_rounds parallel_rounds class_aware_fusion")
# Every comparison first (the targets are judged on them), then the variants.
for name in quickstart digits8 fleet; do
  # shellcheck disable=SC2086
  dcccl compare ${DATA[$name]} --seeds "${SEEDS[@]}" --run_dir "$RESULTS/$name"
done
for name in quickstart digits8 fleet; do
  # shellcheck disable=SC2086
  dcccl ablate ${DATA[$name]} --variants "$VARIANTS" ${ONLY[$name]} --seeds "${SEEDS[@]}" --run_dir "$RESULTS/$name"
done
# Privacy and bandwidth (needs the privacy extra): DP-SGD at epsilon 8, 4 and 1 against no DP, with the membership
# attack's AUC; compressed transfers against the full co-submodel. About 1 hour more.
for name in quickstart digits8; do
  data=""
  [ "$name" = digits8 ] && data="--data configs/data/sklearn_digits.yaml"
  # shellcheck disable=SC2086
  dcccl ablate --config configs/privacy.yaml $data --name "privacy_$name" --variants configs/ablations/privacy.yaml \
    --audit --seeds "${SEEDS[@]}" --run_dir "$RESULTS/privacy_$name"
  # shellcheck disable=SC2086
  dcccl ablate --config configs/quickstart.yaml $data --name "compression_$name" \
    --variants configs/ablations/compression.yaml --seeds "${SEEDS[@]}" --run_dir "$RESULTS/compression_$name"
done
# The set-ups beyond digits (the cross-domain one and the animal silhouettes, one device), then the fleets of 100
# and 1,000 devices: what their recipe is made of (fleet_recipe), and the server optimisers.
declare -A BEYOND=([cross_domain]=configs/data/cross_domain.yaml [animals]=configs/data/animal_shapes.yaml)
for name in cross_domain animals; do
  dcccl compare --config configs/quickstart.yaml --data "${BEYOND[$name]}" --name "$name" --seeds "${SEEDS[@]}" \
    --run_dir "$RESULTS/$name"
  # What the control model is distilled on: the cloud's samples only, Mixup/CutMix-mixed ones, inputs synthesised
  # from the cloud submodel.
  dcccl ablate --config configs/quickstart.yaml --data "${BEYOND[$name]}" --name "$name" \
    --variants configs/ablations/variants.yaml --only mixup_distillation synthesised_distillation \
    --seeds "${SEEDS[@]}" --run_dir "$RESULTS/${name}_distillation_inputs"
done
for variants in fleet_recipe server_optimizers; do
  dcccl ablate --config configs/fleet_100.yaml --variants "configs/ablations/$variants.yaml" --seeds "${SEEDS[@]}" \
    --run_dir "$RESULTS/fleet_100"
  cp "$RESULTS/fleet_100/ablation/ablation.md" "$RESULTS/fleet_100_$variants.md"  # the next ablate rewrites it
done
dcccl ablate --config configs/fleet_1000.yaml --variants configs/ablations/server_optimizers.yaml \
  --seeds "${SEEDS[@]}" --run_dir "$RESULTS/fleet_1000"
cp "$RESULTS/fleet_1000/ablation/ablation.md" "$RESULTS/fleet_1000_server_optimizers.md"
# Aggregation rules under attack on the 20-device fleet (docs/results.md): no attack, then each setting of the table.
# Add latest and krum to --only, or noise and label_flip to the list, for the settings the table leaves out.
for attack in none:0 sign_flip:1 sign_flip:2 sign_flip:4 scale:1 scale:2 nan:2 inflate_count:2; do
  kind=${attack%%:*}; devices=${attack##*:}
  extra=(); [ "$kind" != none ] && extra=(--attack "{devices: $devices, kind: $kind}")
  dcccl ablate --config configs/fleet.yaml --variants configs/ablations/robust_rules.yaml \
    --only median trimmed_mean multi_krum norm_clipping --seeds "${SEEDS[@]}" "${extra[@]}" \
    --run_dir "$RESULTS/attack_${kind}_${devices}"
done
python -c "import torch, lightning, timm; print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__)"
for name in cross_domain animals; do
  echo "== $name: $RESULTS/$name/comparison.md"
  cat "$RESULTS/$name/comparison.md"
done
for name in cross_domain_distillation_inputs animals_distillation_inputs; do
  echo "== $name: $RESULTS/$name/ablation/ablation.md"
  cat "$RESULTS/$name/ablation/ablation.md"
done
for name in fleet_100_fleet_recipe fleet_100_server_optimizers fleet_1000_server_optimizers; do
  echo "== $name: $RESULTS/$name.md"
  cat "$RESULTS/$name.md"
done
for name in quickstart digits8 fleet; do
  echo "== $name: $RESULTS/$name/comparison.md, $RESULTS/$name/ablation/ablation.md"
  cat "$RESULTS/$name/comparison.md" "$RESULTS/$name/ablation/ablation.md"
done
for attack in "${ATTACKS[@]}"; do
  name="attack_${attack%%:*}_${attack##*:}"
  echo "== $name: $RESULTS/$name/ablation/ablation.md"
  cat "$RESULTS/$name/ablation/ablation.md"
done
for name in privacy_quickstart privacy_digits8 compression_quickstart compression_digits8; do
  echo "== $name: $RESULTS/$name/ablation/ablation.md"
  cat "$RESULTS/$name/ablation/ablation.md"
done
