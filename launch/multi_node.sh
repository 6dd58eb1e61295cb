#!/usr/bin/env bash
# Pretraining on several machines with the DeepSpeed launcher and a hostfile (see hostfile.example).
#
#   MASTER_ADDR=10.0.0.1 launch/multi_node.sh HOSTFILE RUN_CONFIG [ofa-ds pretrain options ...]
#
# With passwordless ssh from the first host to all others (and pdsh installed), run it once, on the first
# host: the launcher starts every node over ssh. Without ssh, run it on every node with NODE_RANK set:
#
#   node 0:  NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/multi_node.sh hostfile configs/pretrain/ofa_huge_h100.yaml
#   node 1:  NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/multi_node.sh hostfile configs/pretrain/ofa_huge_h100.yaml
#
# MASTER_ADDR  address of the hostfile's first host, reachable from every node (required)
# MASTER_PORT  rendezvous port, open between the nodes (default 29500)
# GPUS_PER_NODE  ranks per node (default: the hostfile's slots)
#
# Environment: over ssh, the launcher forwards only variables starting with NCCL, PYTHON, UCX, MV2 and
# MLFLOW, plus the KEY=VALUE lines of ~/.deepspeed_env and ./.deepspeed_env. This script hands it one file
# with those lines and DS_ACCELERATOR, OMP_NUM_THREADS, CUDA_DEVICE_MAX_CONNECTIONS, TORCH_EXTENSIONS_DIR and
# OFA_DS_ATTENTION where set, so every node sees them.
# Without ssh, each node's own environment is used: set them on every node. All nodes need the same
# code, Python environment and paths (relative ones are relative to the working directory); out_dir
# (checkpoints) must be on a filesystem they share.
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,/^set -euo/{/^set -euo/d; s/^# \{0,1\}//; p}' "$0" >&2; exit 2; }
HOSTFILE=$1
shift
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the hostfile first host}"
args=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" --no_local_rank)
if [ -n "${GPUS_PER_NODE:-}" ]; then args+=(--num_gpus "$GPUS_PER_NODE"); fi
if [ -n "${NODE_RANK:-}" ]; then
  args+=(--no_ssh --node_rank "$NODE_RANK")
else  # the user's .deepspeed_env files plus the variables below, in a file of our own
  envfile=$(mktemp "${TMPDIR:-/tmp}/ofa_ds_env.XXXXXX")
  for f in ~/.deepspeed_env ./.deepspeed_env; do
    if [ -f "$f" ]; then cat "$f" >> "$envfile"; fi
  done
  for v in DS_ACCELERATOR OMP_NUM_THREADS CUDA_DEVICE_MAX_CONNECTIONS TORCH_EXTENSIONS_DIR OFA_DS_ATTENTION; do
    if [ -n "${!v:-}" ]; then echo "$v=${!v}" >> "$envfile"; fi
  done
  export DS_ENV_FILE=$envfile
fi
source "$(dirname "$0")/forward_signals.sh"  # a signal to this script reaches every rank
forward_signals deepspeed "${args[@]}" --module ofa_ds.cli pretrain "$@"
