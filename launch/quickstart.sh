#!/usr/bin/env bash
# The README's first command: install, make a sample corpus, convert it, train a tokenizer, and pretrain
# ofa_tiny with ZeRO-3 on 2 CPU ranks (configs/pretrain/quickstart.yaml). Everything goes to quickstart_out/.
# Running it again reuses the data and continues (or just reports) the run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=quickstart_out
bash launch/install.sh
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1  # one thread per rank: 2 ranks on 2 cores
ofa() { python3 -m ofa_ds.cli "$@"; }

if [ ! -f $OUT/arrow/manifest.json ]; then
  ofa make-sample-corpus $OUT/tsv --vl-rows 512 --text-rows 128 --image-rows 64 --detection-rows 64
  ofa tsv2arrow $OUT/tsv $OUT/arrow
fi
if [ ! -f $OUT/arrow_val/manifest.json ]; then  # held out: another seed
  ofa make-sample-corpus $OUT/tsv_val --vl-rows 64 --text-rows 16 --image-rows 8 --detection-rows 8 --seed 1
  ofa tsv2arrow $OUT/tsv_val $OUT/arrow_val
fi
[ -f $OUT/tokenizer/tokenizer.json ] || ofa train-tokenizer $OUT/tokenizer --corpus $OUT/arrow --vocab-size 300

deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29500}" --no_local_rank --log_level error \
  --module ofa_ds.cli pretrain configs/pretrain/quickstart.yaml --resume

python3 - <<'PY'
import json
rows = [json.loads(line) for line in open("quickstart_out/run/metrics.jsonl")]
train = [r for r in rows if "train/loss_v1" in r]
val = [r for r in rows if "val/loss" in r]
first, last = train[0], train[-1]
print(f"\nv1 loss (caption, VQA, ITM, grounding): {first['train/loss_v1']:.3f} at step {first['step']} -> "
      f"{last['train/loss_v1']:.3f} at step {last['step']}")
if len(val) > 1:
    print(f"validation loss: {val[0]['val/loss']:.3f} at step {val[0]['step']} -> {val[-1]['val/loss']:.3f} at step {val[-1]['step']}")
print("checkpoints: quickstart_out/run/checkpoints   tensorboard --logdir quickstart_out/run/tb")
PY
ofa plot quickstart_out/run > /dev/null && echo "plots: quickstart_out/run/plots/{loss,tasks,lr,throughput,mfu}.png"
