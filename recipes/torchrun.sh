#!/usr/bin/env bash
# Single node: one process per device.
#   recipes/torchrun.sh CONFIG [CLI overrides...]
#   NPROC=8 recipes/torchrun.sh recipes/ddp.yaml --trainer.max_epochs=20
# NPROC: processes (default: the number of GPUs, else 2). Run from the repository root.
set -euo pipefail
config=${1:?usage: recipes/torchrun.sh CONFIG [CLI overrides...]}
shift
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
exec torchrun --standalone --nproc_per_node="$NPROC" -m recipes.train fit --config "$config" \
  --trainer.devices="$NPROC" "$@"
