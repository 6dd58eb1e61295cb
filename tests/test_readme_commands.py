"""The README's commands, run: every command in a ```bash block of README.md is either run here at a small size (in
the order a user runs them, each expected to exit 0) or listed in NOT_HERE with the reason it cannot run on a CPU
machine in CI. A README command in neither fails the test, so the README cannot drift from the code unnoticed."""

import re
import shlex
import subprocess
import sys

import pretrain_harness as H
import pytest
import yaml

ROOT = H.ROOT
FIXTURE = ROOT / "tests" / "assets" / "ofa_small_ref" / "ofa_small_ref_checkpoint.pt"
# the quickstart's run config at a size that trains in seconds (its data is made by the commands below)
TINY = [
    "--set",
    "model_overrides={vocab_size: 9493, embed_dim: 64, ffn_dim: 128, heads: 2, encoder_layers: 1, decoder_layers: 1}",
    "--set",
    "data.image_size=32",
    "--set",
    "data.extra_image_size=32",
    "--set",
    "data.sample_patch_num=2",
    "--set",
    "train.eval_every=2",
    "--set",
    "train.eval_batches=1",
    "--set",
    "train.save_every=2",
]
DS = f"deepspeed={ROOT / 'configs' / 'ds' / 'cpu_demo.json'}"  # the config names it relative to the checkout
SAMPLE = "--vl-rows 24 --text-rows 4 --image-rows 2 --detection-rows 2 --min-size 32 --max-size 32"

# README command (comment stripped, continuation lines joined) -> what runs here, from a scratch directory in
# which the quickstart's relative paths (quickstart_out/...) resolve; {root}: the checkout, {port}: a free port.
RUN = {
    "ofa-ds make-sample-corpus DIR": [
        f"ofa-ds make-sample-corpus quickstart_out/tsv {SAMPLE}",
        f"ofa-ds make-sample-corpus quickstart_out/tsv_val {SAMPLE} --seed 1",
    ],
    "ofa-ds tsv2arrow TSV_DIR ARROW_DIR": [
        "ofa-ds tsv2arrow quickstart_out/tsv quickstart_out/arrow --workers 1",
        "ofa-ds tsv2arrow quickstart_out/tsv_val quickstart_out/arrow_val --workers 1",
    ],
    # 32000 pieces need a real corpus; the sample corpus takes the quickstart's 300
    "ofa-ds train-tokenizer TOK_DIR --corpus ARROW_DIR --vocab-size 32000": [
        "ofa-ds train-tokenizer quickstart_out/tokenizer --corpus quickstart_out/arrow --vocab-size 300"
    ],
    "NPROC=8 launch/single_node.sh configs/pretrain/ofa_base_a100.yaml --resume": [
        "NPROC=2 MASTER_PORT={port} bash {root}/launch/single_node.sh {root}/configs/pretrain/quickstart.yaml --resume "
        "--set train.steps=2 TINY"
    ],
    "DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --no_local_rank --module ofa_ds.cli pretrain "
    "configs/pretrain/quickstart.yaml --resume --change-geometry --set train.steps=200": [
        "DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --no_local_rank --master_port {port} --module "
        "ofa_ds.cli pretrain {root}/configs/pretrain/quickstart.yaml --resume --change-geometry --set train.steps=4 "
        "TINY"
    ],
    "ofa-ds export runs/ofa_base model.safetensors ofa.pt": [
        "ofa-ds export quickstart_out/run model.safetensors ofa.pt"
    ],
    "ofa-ds to-universal runs/ofa_base": ["ofa-ds to-universal quickstart_out/run"],
    "ofa-ds plot runs/ofa_base [runs/other ...]": ["ofa-ds plot quickstart_out/run"],
    "ofa-ds env": ["ofa-ds env"],
    "deepspeed --num_gpus 8 --no_local_rank --module ofa_ds.cli bench configs/pretrain/ofa_huge_a100x8.yaml": [
        "DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --no_local_rank --master_port {port} --module "
        "ofa_ds.cli bench {root}/configs/pretrain/quickstart.yaml --synthetic --warmup 1 --steps 1 --out bench "
        "--set out_dir=bench_run TINY"
    ],
    "ofa-ds plan ofa_huge --nodes 4 --gpus-per-node 8 --gpu-memory-gb 80 --global-batch 1024": [
        "ofa-ds plan ofa_huge --nodes 4 --gpus-per-node 8 --gpu-memory-gb 80 --global-batch 1024"
    ],
    "python benchmarks/model_step.py --preset ofa_base --batch 2 --shared 2 --attn sdpa": [
        "python {root}/benchmarks/model_step.py --preset ofa_tiny --batch 2 --shared 2 --attn sdpa --image-size 64 "
        "--patches 4 --steps 1 --out model_step.json"
    ],
    "python benchmarks/attention.py": ["python {root}/benchmarks/attention.py --sweep 1 --out attention.json"],
    "python benchmarks/resnet.py": [
        "python {root}/benchmarks/resnet.py --models resnet50 --resolutions 64 "
        "--dtypes fp32 --batch 1 --steps 1 --warmup 0 --out resnet.json"
    ],
    "python benchmarks/corruption_sweep.py --out benchmarks/results/corruption_sweep.json": [
        "python {root}/benchmarks/corruption_sweep.py --work sweep --flips 5 --out sweep.json"
    ],
    "ofa-ds convert ofa_large.pt ofa_large.safetensors": [f"ofa-ds convert {FIXTURE} small.safetensors"],
    "ofa-ds convert ofa_large.safetensors back.pt": ["ofa-ds convert small.safetensors back.pt"],
}
NOT_HERE = {
    "bash tests/run.sh": "the test command itself (.ci/run runs it)",
    "bash launch/quickstart.sh": "its steps run above at a small size (sample corpora, conversion, tokenizer, "
    "2-rank pretraining, resume, plot); the whole takes minutes (timed in the notes)",
    "MASTER_ADDR=node0 launch/multi_node.sh hostfile configs/pretrain/ofa_huge_h100.yaml --resume": (
        "two hosts: tests/test_multinode.py runs it with two simulated nodes"
    ),
    "sbatch --nodes=4 launch/slurm.sbatch configs/pretrain/ofa_huge_h100.yaml": "needs Slurm",
    "python benchmarks/dataloader.py --work /tmp/bench": "writes 2 GB and runs for minutes",
    "python benchmarks/dataloader.py --photos $(python benchmarks/photos.py /tmp/photos) --instructions": (
        "needs scikit-image's photographs and callgrind; about 25 minutes"
    ),
    "python benchmarks/pixel_ops.py --photo /tmp/photos/coffee.jpg": "needs scikit-image's photographs",
}


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        for line in joined.splitlines():
            command = line.split("  #")[0].split("# ")[0].strip() if not line.lstrip().startswith("#") else ""
            if command:
                out.append(" ".join(command.split()))
    return out


def test_every_readme_command_is_run_or_excused():
    commands = readme_commands()
    unknown = [c for c in commands if c not in RUN and c not in NOT_HERE]
    assert not unknown, f"README commands neither run by this test nor excused in NOT_HERE: {unknown}"
    gone = [c for c in [*RUN, *NOT_HERE] if c not in commands]
    assert not gone, f"listed here but no longer in the README: {gone}"


@pytest.mark.slow
def test_readme_commands_run_at_a_small_size(tmp_path):
    cli = f"{shlex.quote(sys.executable)} -m ofa_ds.cli"
    for readme in RUN:
        for command in RUN[readme]:
            command = command.format(root=ROOT, port=H.free_port())
            command = command.replace("TINY", " ".join(shlex.quote(a) for a in [*TINY, "--set", DS]))
            command = re.sub(r"^python ", f"{sys.executable} ", command)
            command = re.sub(r"(^| )ofa-ds ", rf"\1{cli} ", command)
            done = subprocess.run(
                ["bash", "-c", command], cwd=tmp_path, env=H.env(), capture_output=True, text=True, timeout=900
            )
            assert done.returncode == 0, (readme, command, done.stdout[-2000:], done.stderr[-3000:])
    metrics = [yaml.safe_load(x) for x in (tmp_path / "quickstart_out" / "run" / "metrics.jsonl").open()]
    assert max(m["step"] for m in metrics) == 4  # trained 2, then 2 more after the resume at a longer schedule
    for name in ("model.safetensors", "ofa.pt", "back.pt", "bench", "quickstart_out/run/plots/loss.png"):
        assert (tmp_path / name).exists(), name
