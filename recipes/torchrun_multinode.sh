#!/usr/bin/env bash
# Several nodes, started by hand (or by your scheduler) with the same command on every node:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0.example MASTER_PORT=29500 NPROC=8 \
#     recipes/torchrun_multinode.sh recipes/ddp.yaml [CLI overrides...]
# NODE_RANK is 0 on the node at MASTER_ADDR and 1..NNODES-1 elsewhere. For recipes/fsdp.yaml also pass
# --trainer.strategy.init_args.data_parallel_size=$((NNODES * NPROC)). Run from the repository root.
set -euo pipefail
config=${1:?usage: recipes/torchrun_multinode.sh CONFIG [CLI overrides...]}
shift
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}" "${NPROC:?set NPROC}"
exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" \
  -m recipes.train fit --config "$config" --trainer.num_nodes="$NNODES" --trainer.devices="$NPROC" "$@"
