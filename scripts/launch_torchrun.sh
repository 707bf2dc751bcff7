#!/usr/bin/env bash
# Train on every GPU of one node with torchrun (one process per GPU, DDP or FSDP from the recipe).
#
#   scripts/launch_torchrun.sh RECIPE [GPUS] [--any.recipe.key VALUE ...]
#   scripts/launch_torchrun.sh recipes/quickstart.yaml 8 --trainer.strategy fsdp
set -euo pipefail
recipe=${1:?usage: $0 RECIPE [GPUS] [overrides...]}
shift
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then gpus=$1; shift; fi
if [[ $gpus -lt 1 ]]; then echo "no GPU found; pass the GPU count as the second argument" >&2; exit 2; fi

# Every rank must write into the same run directory: name it once, here.
name=$(python3 -m mambatrain fit "$recipe" --print-config "$@" | python3 -c \
  'import sys, yaml; l = yaml.safe_load(sys.stdin)["logging"]; print(l["root_dir"] + "/" + l["run_name"])')
export MAMBATRAIN_RUN_DIR=${MAMBATRAIN_RUN_DIR:-$name/torchrun-$(date +%Y%m%d-%H%M%S)}
echo "run directory: $MAMBATRAIN_RUN_DIR"

exec torchrun --standalone --nproc_per_node "$gpus" -m mambatrain fit "$recipe" \
  --trainer.devices "$gpus" --trainer.strategy "${MAMBATRAIN_STRATEGY:-ddp}" "$@"
