#!/usr/bin/env bash
# Pretraining on one machine, one process per GPU (or N CPU ranks), with the DeepSpeed launcher.
#
#   launch/single_node.sh RUN_CONFIG [ofa-ds pretrain options ...]
#   NPROC=4 launch/single_node.sh configs/pretrain/ofa_base_a100.yaml --set train.steps=1000 --resume
#
# NPROC: ranks (default: every visible GPU; on a machine without GPUs, 2 CPU ranks with DS_ACCELERATOR=cpu).
# MASTER_PORT: rendezvous port (default 29500; pick another when two jobs share a machine).
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,/^set -euo/{/^set -euo/d; s/^# \{0,1\}//; p}' "$0" >&2; exit 2; }
if python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  NPROC=${NPROC:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
else
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # per rank; the launcher does not set it
  NPROC=${NPROC:-2}
fi
source "$(dirname "$0")/forward_signals.sh"  # a signal to this script reaches every rank
forward_signals deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" --no_local_rank --log_level error \
  --module ofa_ds.cli pretrain "$@"
