"""Multi-rank pretraining runs for the tests: a tiny corpus and model, launchers, and test-only faults.

As a script it is one rank of `ofa-ds pretrain`, optionally with a fault injected on rank 0:

    python tests/pretrain_harness.py [--fault KIND@STEP] [--dump-weights FILE] [--fixed-batch] ... -- PRETRAIN_ARGS

    sigterm@K        after update K, SIGTERM to every rank (the process group), as Slurm or a launcher does
    kill@K           after update K, SIGKILL to every rank (a node lost, an OOM kill): no checkpoint is written
    crash-in-save@K  SIGKILL to every rank while rank 0 writes its ZeRO shard of checkpoint K
    nan@K            the loss of update K is NaN
    overflow@K       update K's gradients overflow fp16 (its loss is scaled by 1e30 in the backward only)
    --dump-weights   after the last checkpoint, the live (partitioned) parameters gathered to rank 0 and saved;
                     FILE.json gets the largest |logits| difference between engine(x) and the model's own
                     encode + decode called outside the engine's forward
    --fixed-batch    every micro-step sees the loader's first micro-batch
    --trace-init DIR each rank that reads the init_from file touches DIR/rank{R}
    --record-lr FILE rank 0 writes, per applied optimizer step, [update, lr] as JSON lines
    --cpu-fp16       DeepSpeed's CPU accelerator reports fp16 (torch runs fp16 on any x86-64 CPU, slowly; the
                     accelerator answers from the CPU's oneDNN features)
    --fake-host      rank R reports host node-R (a node per rank)
    --param-bytes DIR  each rank writes DIR/rank{R}.json: the bytes of the parameters it holds once the engine is
                     built (its tensor-parallel share, and what ZeRO leaves resident), by part of the model
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARNESS = Path(__file__).resolve()
# OFA's dropout, drop-path and per-rank BatchNorm: the paths pretraining runs.
TINY_MODEL = dict(
    embed_dim=64,
    ffn_dim=128,
    heads=2,
    encoder_layers=1,
    decoder_layers=1,
    resnet="resnet18",
    dropout=0.1,
    encoder_drop_path=0.1,
    decoder_drop_path=0.1,
    bn_mode="batch",
)
TINY_DATA = dict(image_size=32, extra_image_size=32, sample_patch_num=2, num_workers=0)
# OFA_SPEC 7: AdamW lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0.01, clip 5.0
DS_FP32_ZERO3 = {
    "zero_optimization": {"stage": 3},
    "gradient_clipping": 5.0,
    "steps_per_print": 10**9,
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "torch_adam": True},
    },
}
# ZeRO-3 with every parameter partitioned (DeepSpeed keeps tensors under 1e5 elements whole by default: almost all
# of the tiny model's)
DS_PARTITIONED = {**DS_FP32_ZERO3, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
THRESHOLDS = {"default": DS_FP32_ZERO3, "partitioned": DS_PARTITIONED}


# ---------------------------------------------------------------------------------------------------- test side


def tiny_data(base: Path) -> dict:
    """Sample corpus -> Arrow shards -> sentencepiece tokenizer, built once under `base`."""
    from ofa_ds.cli import main

    done = base / "done.json"
    if not done.is_file():
        main(
            [
                "make-sample-corpus",
                str(base / "tsv"),
                "--vl-rows",
                "64",
                "--text-rows",
                "16",
                "--image-rows",
                "8",
                "--detection-rows",
                "8",
                "--min-size",
                "48",
                "--max-size",
                "80",
            ]
        )
        main(["tsv2arrow", str(base / "tsv"), str(base / "arrow"), "--workers", "1"])
        main(["train-tokenizer", str(base / "tok"), "--corpus", str(base / "arrow"), "--vocab-size", "300"])
        from ofa_ds.data.tokenizer import load_tokenizer

        vocab = load_tokenizer(base / "tok").vocab_size
        done.write_text(json.dumps({"corpus": str(base / "arrow"), "tokenizer": str(base / "tok"), "vocab": vocab}))
    return json.loads(done.read_text())


def write_run(out_dir: Path, data: dict, *, ds: dict | None = None, train: dict | None = None, **top) -> Path:
    """A run config (and its DeepSpeed config) for the tiny model; returns the config path."""
    import yaml

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ds.json").write_text(json.dumps(ds or DS_FP32_ZERO3))
    cfg = {
        "model": "ofa_tiny",
        "model_overrides": {**TINY_MODEL, "vocab_size": data["vocab"]},
        "corpus": data["corpus"],
        "data": {**TINY_DATA, "tokenizer": data["tokenizer"]},
        "deepspeed": str(out_dir / "ds.json"),
        "out_dir": str(out_dir / "run"),
        "train": {
            "steps": 6,
            "global_batch": 8,
            "micro_batch": 2,
            "log_every": 1,
            "save_every": 3,
            "keep_last": 2,
            "peak_tflops": 1.0,
            **(train or {}),
        },
        **top,
    }
    path = out_dir / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": path}


def launch(
    nprocs: int,
    pretrain_args: list[str],
    *,
    harness: list[str] = (),
    timeout: float = 600,
    rank_env: dict[int, dict] | None = None,
):
    """Start `nprocs` ranks directly (as torchrun would) in one new process group and wait for all of them.
    Returns (return codes, combined output). The timeout is generous: the first launch on a machine JIT-builds
    DeepSpeed's CPU comm op (2-4 minutes)."""
    port = free_port()
    procs, logs = [], []
    for rank in range(nprocs):
        e = {
            **env(),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nprocs),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            **(rank_env or {}).get(rank, {}),
        }
        logs.append(tempfile.TemporaryFile("w+"))
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HARNESS), *harness, "--", *pretrain_args],
                env=e,
                cwd=ROOT,
                stdout=logs[-1],
                stderr=subprocess.STDOUT,
                process_group=procs[0].pid if procs else 0,
            )
        )
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        os.killpg(procs[0].pid, signal.SIGKILL)
        raise
    out = []
    for rank, log in enumerate(logs):
        log.seek(0)
        out.append(f"----- rank {rank}\n{log.read()}")
        log.close()
    return codes, "\n".join(out)


def metrics(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    """step -> value from metrics.jsonl (a resumed run's later lines win)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get(key) is not None:
            out[rec["step"]] = rec[key]
    return out


def reference_run(base: Path, data: dict, variant: str = "default") -> Path:
    """The uninterrupted 2-rank ZeRO-3 fp32 run that the equivalence, resume and export tests compare with: 4 updates
    from init.safetensors, checkpoints at 2 and 4, live weights dumped at the end. `variant` is a key of THRESHOLDS.
    Made once per session and variant."""
    d = base / f"reference_run_{variant}"
    if not (d / "done").is_file():
        import torch

        from ofa_ds.config import ModelConfig, model_preset
        from ofa_ds.model.convert import save_safetensors
        from ofa_ds.model.ofa import OFAModel

        cfg = ModelConfig.from_dict({**model_preset("ofa_tiny").to_dict(), **TINY_MODEL, "vocab_size": data["vocab"]})
        torch.manual_seed(0)
        d.mkdir(parents=True, exist_ok=True)
        save_safetensors(OFAModel(cfg).state_dict(), cfg, d / "init.safetensors")
        run = write_run(d, data, ds=THRESHOLDS[variant], train={"steps": 4, "save_every": 2, "keep_last": 3})
        codes, out = launch(
            2,
            [str(run), "--init-from", str(d / "init.safetensors")],
            harness=["--dump-weights", str(d / "live.pt"), "--trace-init", str(d / "init_reads")],
        )
        assert codes == [0, 0], out
        (d / "done").write_text("")
    return d


# ---------------------------------------------------------------------------------------------------- rank side


def main(argv: list[str]) -> int:
    import argparse

    sys.path.insert(0, str(ROOT))
    ap = argparse.ArgumentParser()
    ap.add_argument("--fault")
    ap.add_argument("--dump-weights")
    ap.add_argument("--fixed-batch", action="store_true")
    ap.add_argument("--trace-init")
    ap.add_argument("--record-lr")
    ap.add_argument("--cpu-fp16", action="store_true")
    ap.add_argument("--fake-host", action="store_true")
    ap.add_argument("--param-bytes")
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    if args.fault:
        kind, step = args.fault.split("@")
        _inject(kind, int(step))
    if args.dump_weights:
        _dump_weights_after_last_save(args.dump_weights)
    if args.fixed_batch:
        _fixed_batch()
    if args.trace_init:
        _trace_init(Path(args.trace_init))
    if args.record_lr:
        _record_lr(args.record_lr)
    if args.cpu_fp16:
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        CPU_Accelerator.is_fp16_supported = lambda self: True
    if args.fake_host:
        socket.gethostname = lambda: f"node-{os.environ['RANK']}"
    if args.param_bytes:
        _param_bytes(Path(args.param_bytes))
    from ofa_ds.cli import main as cli

    return cli(["pretrain", *rest])


def _rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _inject(kind: str, k: int) -> None:
    import torch

    from ofa_ds.train import engine

    step = engine.train_step

    def train_step(eng, *a, **kw):
        here = eng.global_steps == k - 1
        if here and kind == "nan":
            orig = engine.token_nll
            engine.token_nll = lambda *x, **y: orig(*x, **y) * torch.tensor(float("nan"))
        if here and kind == "overflow":
            eng.backward = lambda loss, **y: type(eng).backward(eng, loss * 1e30, **y)
        stats = step(eng, *a, **kw)
        if here and kind == "nan":
            engine.token_nll = orig
        if here and kind == "overflow":
            del eng.backward
        if eng.global_steps == k and _rank0() and kind in ("sigterm", "kill"):
            os.killpg(os.getpgrp(), signal.SIGTERM if kind == "sigterm" else signal.SIGKILL)
        return stats

    engine.train_step = train_step
    if kind == "crash-in-save":
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        save = TorchCheckpointEngine.save

        def save_then_crash(self, state_dict, path):
            save(self, state_dict, path)
            if _rank0() and f"step_{k:08d}" in str(path) and "optim_states" in str(path):
                os.killpg(os.getpgrp(), signal.SIGKILL)

        TorchCheckpointEngine.save = save_then_crash


def _dump_weights_after_last_save(path: str) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from ofa_ds.train import checkpoint

    save = checkpoint.save

    def save_and_dump(engine, ckpt_dir, meta, keep_last):
        out = save(engine, ckpt_dir, meta, keep_last)
        if meta["step"] == meta["config"]["train"]["steps"]:
            live = {}
            for name, p in engine.module.named_parameters():
                with deepspeed.zero.GatheredParameters([p]):
                    live[name] = p.detach().clone()
            live.update({k: b.detach().clone() for k, b in engine.module.state_dict().items() if k not in live})
            if dist.get_rank() == 0:
                torch.save(live, path)
            diff = _encode_decode_outside_the_engine(engine)
            if dist.get_rank() == 0:
                Path(path + ".json").write_text(json.dumps({"encode_decode_max_diff": diff}))
        return out

    checkpoint.save = save_and_dump


@__import__("torch").no_grad()
def _encode_decode_outside_the_engine(engine) -> float:
    """Logits of engine(x) against model.encode + model.decode called directly (outside the engine's forward: under
    ZeRO-3 each module must gather what it reads by itself), on a fixed random batch, in eval mode."""
    import torch

    from ofa_ds.train.engine import _compute_dtype

    model, cfg = engine.module, engine.module.cfg
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 32, 32, generator=g).to(_compute_dtype(engine))
    x = {
        "src_tokens": torch.randint(4, cfg.vocab_size, (2, 6), generator=g),
        "patch_images": images,
        "patch_masks": torch.tensor([True, False]),
        "prev_output_tokens": torch.randint(4, cfg.vocab_size, (2, 5), generator=g),
    }
    engine.eval()
    whole = engine(x)
    parts = model.decode(x["prev_output_tokens"], model.encode(x["src_tokens"], x["patch_images"], x["patch_masks"]))
    engine.train()
    return float((whole - parts).abs().max())


def _trace_init(d: Path) -> None:
    from ofa_ds.train import engine

    read = engine.init_state_dict

    def traced(*a, **kw):
        d.mkdir(parents=True, exist_ok=True)
        (d / f"rank{os.environ['RANK']}").write_text("")
        return read(*a, **kw)

    engine.init_state_dict = traced


def _record_lr(path: str) -> None:
    """Rank 0 appends [update, lr] each time the torch optimizer under DeepSpeed really steps."""
    from ofa_ds.train import engine

    initialize = engine.initialize

    def recording(*a, **kw):
        eng = initialize(*a, **kw)
        opt = eng.basic_optimizer
        step = opt.step

        def recorded_step(*x, **y):
            if _rank0():
                with open(path, "a") as f:
                    f.write(json.dumps([eng.global_steps + 1, opt.param_groups[0]["lr"]]) + "\n")
            return step(*x, **y)

        opt.step = recorded_step
        return eng

    engine.initialize = recording


def _param_bytes(d: Path) -> None:
    from ofa_ds.train import engine

    initialize = engine.initialize

    def measured(model, *a, **kw):
        eng = initialize(model, *a, **kw)
        out = {}
        for name, p in model.named_parameters():
            # names of the plain model or of a pipeline module's stage ("3.layer.fc1.weight", "tied_modules.embed...")
            part = (
                "layers"
                if ".layers." in name or ".layer." in name
                else "embedding"
                if name.startswith(("embed_tokens", "tied_modules.embed"))
                else "resnet"
                if "embed_images." in name
                else "other"
            )
            share = getattr(p, "ds_numel", p.numel()) * p.element_size()
            resident = (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()) * p.element_size()
            for key, n in ((part, share), (f"{part}_resident", resident)):
                out[key] = out.get(key, 0) + n
        d.mkdir(parents=True, exist_ok=True)
        (d / f"rank{os.environ['RANK']}.json").write_text(json.dumps(out))
        return eng

    engine.initialize = measured


def _fixed_batch() -> None:
    """Every micro-step gets the loader's first micro-batch (so a run without accumulation sees one batch)."""
    import itertools

    from ofa_ds.data import loader

    build = loader.build_loader

    class Fixed:
        def __init__(self, batch):
            self.batch = batch

        def __iter__(self):
            return itertools.repeat(self.batch)

    loader.build_loader = lambda *a, **kw: Fixed(next(iter(build(*a, **kw))))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
