"""`ofa-ds pretrain CONFIG`: OFA pretraining on DeepSpeed, one process per device.

    deepspeed --num_gpus 8 --no_local_rank --module ofa_ds.cli pretrain configs/pretrain/ofa_base_a100.yaml
    torchrun --nproc_per_node 8 -m ofa_ds.cli pretrain configs/pretrain/ofa_base_a100.yaml --set train.steps=100
    DS_ACCELERATOR=cpu ofa-ds pretrain configs/pretrain/quickstart.yaml        # one process, no launcher

Everything that can be checked is checked before the process group starts: the run config (unknown keys,
types), the DeepSpeed config, the batch geometry against the world size, the corpus manifest, the tokenizer
against the model, and a checkpoint to resume against the model and world size.

OUT_DIR gets config.yaml (the resolved run config), ds_config.json, metrics.jsonl, tb/ and checkpoints/.
A checkpoint is written every train.save_every updates, at the end, and when any rank gets SIGTERM or
SIGINT (after the update in progress). A non-finite loss (or, outside fp16, gradient norm) stops the run
without saving, so `latest` stays on the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import sys
import time
import warnings

import numpy as np
import torch

from ofa_ds.config import ConfigError, save_dict
from ofa_ds.train.ds_json import precision
from ofa_ds.train.prepare import Plan, add_arguments, prepare

__all__ = ["add_arguments", "run", "Trainer"]  # the CLI's subcommand: prepare's arguments, this run

# ---------------------------------------------------------------------------------------------------- signals


class StopRequest:
    """SIGTERM / SIGINT ask for a checkpoint and a clean exit after the update in progress."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name


class Diverged(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------- run


def run(args) -> int:
    from ofa_ds.model.convert import CheckpointError

    try:
        plan = prepare(args)  # no process group yet: bad input fails here, on every rank alike
    except ConfigError as e:
        print(f"ofa-ds pretrain: {e}", file=sys.stderr)
        return 2
    from ofa_ds.train import run_lock

    lock = None
    if os.environ.get("RANK", "0") == "0":  # one writer per out_dir, decided before the process group starts
        try:
            lock = run_lock.acquire(plan.out_dir)
        except ConfigError as e:
            print(f"ofa-ds pretrain: {e}", file=sys.stderr)
            return 2
    _quiet_deepspeed()
    if plan.run.parallel.sequence_parallel:
        # megatron-core's sequence-parallel linears overlap their gathers with compute only if CUDA runs kernels in
        # the order they are queued (Megatron's launchers set it too); before CUDA starts
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    from ofa_ds.data.shards import CorpusError
    from ofa_ds.data.tasks import DataError
    from ofa_ds.train.engine import KernelMismatch, init_distributed

    logs = plan.out_dir / "logs"  # third-party chatter (DeepSpeed's op builds) stays here, out of the user's way
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"deepspeed_rank{os.environ.get('RANK', '0')}.log", "a") as log, contextlib.redirect_stdout(log):
        backend = init_distributed()
    try:
        return Trainer(plan, backend).fit()
    except (Diverged, CheckpointError, KernelMismatch, CorpusError, DataError) as e:
        message = str(e)
        if "Original Traceback" in message:  # a DataLoader worker's error, wrapped with the worker's traceback
            message = message.strip().splitlines()[-1]
        print(f"ofa-ds pretrain: {message}", file=sys.stderr)
        import torch.distributed as dist

        dist.destroy_process_group()  # a process that exits with its group's threads running aborts
        return 1
    finally:
        if lock is not None:
            lock.release()


def _quiet_deepspeed() -> None:
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


class Trainer:
    def __init__(self, plan: Plan, backend: str):
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

        from ofa_ds.data.tasks import TASKS
        from ofa_ds.parallel import groups
        from ofa_ds.train import engine as eng
        from ofa_ds.train.metrics import peak_tflops

        self.plan, self.run_cfg, self.train = plan, plan.run, plan.run.train
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.groups = groups.build(plan.run.parallel)
        self.dp_rank, self.dp = self.groups.dp_rank, self.groups.dp_size
        self.tasks = TASKS
        self.backend = backend
        if self.rank == 0:
            (plan.out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            save_dict(self.run_cfg.to_dict(), plan.out_dir / "config.yaml")
            save_dict(plan.ds, plan.out_dir / "ds_config.json")

        self.kernels = eng.agree_on_kernels(plan.model, torch.device(get_accelerator().current_device_name()))
        from ofa_ds.parallel import checkpointing

        model = eng.build_model(
            plan.model, plan.ds, self.train.seed, self.groups, checkpointing.every(self.train.activation_checkpointing)
        )
        if self.run_cfg.init_from and plan.resume is None:
            eng.load_init(model, self.run_cfg.init_from, plan.model, self.groups)
        if plan.relayout:
            from ofa_ds.train import universal

            eng.load_weights(model, universal.read_weights(plan.resume) if self.rank == 0 else None, self.groups)
        if self.groups.pp_size > 1:
            model = eng.as_pipeline(model, plan.ds, self.groups, len(self.tasks))
        self.engine = eng.initialize(model, plan.ds, self.groups)
        self.step = self.consumed = 0  # updates done, global VL rows consumed (the sampler position)
        if plan.resume is not None:
            from ofa_ds.train import checkpoint

            if plan.relayout:
                universal.load_optimizer_states(self.engine, plan.resume, self.groups, plan.model)
                meta = checkpoint.read_meta(plan.resume)
            else:
                meta = checkpoint.load(self.engine, plan.resume)
            self.step, self.consumed = meta["step"], meta["consumed_samples"]
        if plan.resume is None or plan.relayout:
            # dropout streams differ between data-parallel ranks and agree within a TP group (whose activations
            # outside the split layers are replicated); another layout's streams cannot be carried over
            seed = self.train.seed + 1000 * self.dp_rank + 1_000_003 * self.step
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
        self.peak, self.peak_source = peak_tflops(self.train.peak_tflops, precision(plan.ds))

    # ------------------------------------------------------------------------------------------------ loop

    def fit(self) -> int:
        from ofa_ds.data.loader import build_loader
        from ofa_ds.train import schedule
        from ofa_ds.train.engine import train_step
        from ofa_ds.train.metrics import Metrics

        plan, train = self.plan, self.train
        if self.rank == 0:
            print(self.summary(), flush=True)
        self.metrics = Metrics(plan.out_dir, rank=self.rank, steps=train.steps, start_step=self.step)
        stop = StopRequest()
        loader = build_loader(
            plan.corpus,
            plan.tokenizer,
            self.run_cfg.data,
            dp_rank=self.dp_rank,
            dp_size=self.dp,
            micro_batch=train.micro_batch,
            consumed_samples=self.consumed,
        )
        batches = iter(loader)
        gas = train.accumulation(self.dp)
        validate = train.eval_every > 0 and plan.val_corpus is not None
        if validate and self.step == 0:
            self.evaluate()  # the starting point
        start = saved_step = self.step
        # FLOPs, examples, tokens, updates, seconds waiting for the loader
        t_last, window = time.perf_counter(), torch.zeros(5, dtype=torch.float64)
        try:
            while self.step < train.steps:
                t_fetch = time.perf_counter()
                micro, error = self._fetch(batches, gas)
                waited = time.perf_counter() - t_fetch
                if self._agree_to_stop(stop.signal is not None, error):
                    self.metrics.print(f"step {self.step}: {stop.signal or 'stop'} received, saving a checkpoint")
                    break
                lr = self.lr(self.step + 1)
                schedule.set_lr(self.engine.optimizer, lr)
                stats = train_step(
                    self.engine, micro, model_cfg=plan.model, num_tasks=len(self.tasks), groups=self.groups
                )
                self.step += 1
                self.consumed += train.global_batch
                self._check_finite(stats)
                window += torch.tensor(
                    [stats.flops, stats.examples, sum(stats.tokens), 1.0, waited], dtype=torch.float64
                )
                if self.step % train.log_every == 0 or self.step in (start + 1, train.steps):
                    now = time.perf_counter()
                    self._log(stats, lr, window, now - t_last)
                    t_last, window = now, torch.zeros_like(window)
                self.metrics.advance(
                    self.step, stats.stream_loss[0], stats.stream_loss[1] if stats.tokens[1] else None, lr
                )
                t0 = time.perf_counter()
                if validate and self.step % train.eval_every == 0:
                    self.evaluate()
                if self.step % train.save_every == 0:
                    self.save()
                    saved_step = self.step
                t_last += time.perf_counter() - t0  # validation and saving are not training throughput
            if saved_step != self.step:
                self.save()
        finally:
            self.metrics.close()
        where = (plan.out_dir / "checkpoints").resolve()
        self.metrics.print(
            f"done at step {self.step}: checkpoint {where}/latest, tensorboard --logdir "
            f"{(plan.out_dir / 'tb').resolve()}, metrics {(plan.out_dir / 'metrics.jsonl').resolve()}"
        )
        return 0

    def lr(self, t: int) -> float:
        """The learning rate of update t (1-based) of this run's schedule."""
        from ofa_ds.train import schedule

        t_cfg = self.train
        return schedule.lr_at(
            t,
            peak=self.plan.ds["optimizer"]["params"]["lr"],
            steps=t_cfg.steps,
            warmup_ratio=t_cfg.warmup_ratio,
            power=t_cfg.lr_power,
            end_lr=t_cfg.end_lr,
        )

    def _fetch(self, batches, n: int):
        """n micro-batches, or the error if the loader failed (e.g. its workers were signalled)."""
        try:
            micro = [next(batches) for _ in range(n)]
        except Exception as e:  # noqa: BLE001 - decided together with the other ranks in _agree_to_stop
            return None, e
        finally:
            # A DataLoader worker that dies (a launcher or Slurm signals the whole process tree) must surface
            # here, at a fetch, where the ranks decide together; torch's SIGCHLD handler would raise at an
            # arbitrary point instead, e.g. inside a collective. The loader notices dead workers by itself.
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        return micro, None

    def _agree_to_stop(self, stop: bool, error: Exception | None) -> bool:
        """All ranks learn whether any rank was signalled or lost its data; a loader error without a signal
        is raised on every rank (instead of leaving the others waiting in a collective)."""
        import torch.distributed as dist

        flags = torch.tensor([float(stop), float(error is not None)], dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(flags)
        if flags[0] > 0:
            return True
        if error is not None:
            raise error
        if flags[1] > 0:
            raise RuntimeError("another rank's data loader failed (see its error above)")
        return False

    def _check_finite(self, stats) -> None:
        norm = self.engine.get_global_grad_norm()
        bad = not math.isfinite(stats.loss)
        if not self.engine.fp16_enabled():  # fp16 overflows are skipped by the loss scaler
            bad |= norm is not None and not math.isfinite(float(norm))
        if bad:
            latest = self.plan.out_dir / "checkpoints" / "latest"
            last = latest.read_text().strip() if latest.is_file() else "none"
            raise Diverged(
                f"step {self.step}: non-finite loss {stats.loss} or gradient norm {norm}; stopping without "
                f"saving (last good checkpoint: {last})"
            )

    # ------------------------------------------------------------------------------------------------ reporting

    def _log(self, stats, lr: float, window: torch.Tensor, seconds: float) -> None:
        """The update's losses; throughput over the `window` of updates since the last log, `seconds` long."""
        import torch.distributed as dist

        from ofa_ds.train.engine import loss_scale
        from ofa_ds.train.metrics import memory_gb

        scalars = {
            "train/loss": stats.loss,
            "train/loss_v1": stats.stream_loss[0],
            "train/loss_v2": stats.stream_loss[1] if stats.tokens[1] else None,
            "train/lr": lr,
            "train/grad_norm": _float(self.engine.get_global_grad_norm()),
            "train/loss_scale": loss_scale(self.engine),
            "train/skipped_updates": self.engine.skipped_steps if self.engine.fp16_enabled() else None,
        }
        for i, name in enumerate(self.tasks):
            if stats.task_nll[1, i] > 0:
                scalars[f"train/nll/{name}"] = float(stats.task_nll[0, i] / stats.task_nll[1, i])
        flops, examples, tokens, updates, waited = window.tolist()
        waited = torch.tensor(waited / updates, device=self.engine.device)
        dist.all_reduce(waited, op=dist.ReduceOp.MAX)  # the slowest rank's loader holds every rank up
        tflops = flops / seconds / self.world / 1e12
        scalars.update(
            {
                "perf/step_s": seconds / updates,
                "perf/samples_per_s": examples / seconds,
                "perf/tokens_per_s": tokens / seconds,
                "perf/data_wait_s": float(waited),
                "perf/tflops": tflops,
                "perf/mfu": tflops / self.peak if self.peak else None,
                "perf/mem_gb": memory_gb(),
            }
        )
        self.metrics.log(self.step, scalars)

    def evaluate(self) -> None:
        from ofa_ds.data.loader import build_loader
        from ofa_ds.train import checkpoint
        from ofa_ds.train.engine import eval_sums

        rng = checkpoint.rng_state()  # validation must not change what training draws next
        loader = build_loader(
            self.plan.val_corpus,
            self.plan.tokenizer,
            self.run_cfg.data,
            dp_rank=self.dp_rank,
            dp_size=self.dp,
            micro_batch=self.train.micro_batch,
            num_workers=0,
        )
        it = iter(loader)
        sums = eval_sums(
            self.engine,
            [next(it) for _ in range(self.train.eval_batches)],
            model_cfg=self.plan.model,
            num_tasks=len(self.tasks),
            groups=self.groups,
        )
        checkpoint.set_rng_state(rng)
        streams = [float(sums[0, i] / sums[1, i]) if sums[1, i] > 0 else None for i in range(2)]
        scalars = {
            "val/loss": sum(v for v in streams if v is not None),
            "val/loss_v1": streams[0],
            "val/loss_v2": streams[1],
        }
        for i, name in enumerate(self.tasks):
            if sums[1, 2 + i] > 0:
                scalars[f"val/nll/{name}"] = float(sums[0, 2 + i] / sums[1, 2 + i])
        self.metrics.log(self.step, scalars)
        self.metrics.print(f"step {self.step}: val/loss {scalars['val/loss']:.4f}")

    def save(self) -> None:
        from ofa_ds.train import checkpoint

        run = self.run_cfg.to_dict()
        meta = {
            "step": self.step,
            "consumed_samples": self.consumed,
            "world_size": self.world,
            "parallel": self.run_cfg.parallel.describe(self.world),
            "model": self.plan.model.to_dict(),
            "config": run,
            "config_hash": checkpoint.config_hash(run),
            "model_hash": checkpoint.config_hash(self.plan.model.to_dict()),
            "ds_config": self.plan.ds,
            "time": time.time(),
        }
        t0 = time.perf_counter()
        tag_dir = checkpoint.save(self.engine, self.plan.out_dir / "checkpoints", meta, self.train.keep_last)
        seconds = time.perf_counter() - t0  # what a pre-emption's grace period must cover (launch/README.md)
        size = sum(f.stat().st_size for f in tag_dir.rglob("*") if f.is_file()) if self.rank == 0 else 0
        self.metrics.print(f"step {self.step}: checkpoint {tag_dir} ({size / 1e9:.2f} GB in {seconds:.1f} s)")

    def summary(self) -> str:
        from ofa_ds.model.ofa import OFAModel
        from ofa_ds.train.ds_json import zero_stage
        from ofa_ds.train.flops import StreamShape, train_flops
        from ofa_ds.train.metrics import summary

        p, m, t, ds = self.plan, self.plan.model, self.train, self.plan.ds
        with torch.device("meta"):
            params = OFAModel(m).num_parameters()
        here = sum(getattr(q, "ds_numel", q.numel()) for q in self.engine.module.parameters())
        nodes = int(os.environ.get("CROSS_SIZE", os.environ.get("GROUP_WORLD_SIZE", "1")))
        per_node = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", self.world // nodes)))
        opt = ds["optimizer"].get("params", {})
        offload = [
            k
            for k in ("offload_param", "offload_optimizer")
            if ds["zero_optimization"].get(k, {}).get("device", "none") != "none"
        ]
        c = p.corpus
        data = (
            f"{p.run.corpus}: {len(c.vl):,} VL, {len(c.text):,} text, {len(c.image):,} image, "
            f"{len(c.detection):,} detection rows"
        )
        if p.val_corpus is not None:
            data += f"; validation {p.run.val_corpus}: {len(p.val_corpus.vl):,} VL rows"
        d = p.run.data
        one_row = train_flops(
            m,
            [
                StreamShape(
                    2,
                    d.image_size,
                    d.sample_patch_num if d.sample_patch_num > 0 else (d.image_size // 16) ** 2,
                    32,
                    16,
                    images=1,
                )
            ],
        )
        rows = [
            (
                "model",
                f"{m.name}: {params:,} parameters, {here:,} on rank 0 before ZeRO "
                f"(d={m.embed_dim}, {m.encoder_layers}+{m.decoder_layers} layers, "
                f"{m.heads} heads, {m.resnet}, V={m.vocab_size}, bn {m.bn_mode})",
            ),
            (
                "parallel",
                f"{p.run.parallel.describe(self.world)} = {self.world} rank(s) on {nodes} node(s) of "
                f"{per_node}, {self.backend}, sequence parallel {'on' if p.run.parallel.sequence_parallel else 'off'}, "
                f"device {self.engine.device}, activation checkpointing "
                f"{t.activation_checkpointing}; "
                f"kernels: attention {self.kernels['attention']}, "
                f"resnet {self.kernels['resnet']} (the same on every rank)",
            ),
            (
                "deepspeed",
                f"{p.run.deepspeed}: ZeRO stage {zero_stage(ds)}, {precision(ds)}"
                + (f", offload {'+'.join(offload)}" if offload else "")
                + f", {type(self.engine.basic_optimizer).__name__} lr {opt.get('lr')} betas {opt.get('betas')} "
                f"eps {opt.get('eps')} wd {opt.get('weight_decay')}, clip {ds['gradient_clipping']}",
            ),
            (
                "batch",
                f"{t.global_batch} VL rows/update = {t.micro_batch} per rank x {self.dp} data-parallel rank(s) x "
                f"{t.accumulation(self.dp)} accumulation (each row: 2 v1 examples; 8th rows add 4 v2)",
            ),
            (
                "schedule",
                f"{t.steps} updates, warmup {int(t.warmup_ratio * t.steps)}, decay power {t.lr_power} to "
                f"{t.end_lr}"
                + (
                    f", resuming at {self.step} from {p.resume}" + (" (universal)" if p.relayout else "")
                    if p.resume
                    else ""
                )
                + (f", init from {p.run.init_from}" if p.run.init_from and not p.resume else ""),
            ),
            ("data", data + f"; tokenizer {d.tokenizer} (V={p.tokenizer.vocab_size})"),
            (
                "flops",
                f"~{one_row / 1e9:.2f} GFLOP per VL row (analytic); peak "
                + (f"{self.peak:.3g} TFLOP/s per device ({self.peak_source})" if self.peak else self.peak_source),
            ),
            (
                "output",
                f"{p.out_dir}: checkpoints every {t.save_every} (keep {t.keep_last}), tb/, metrics.jsonl, "
                "logs/ (DeepSpeed's own messages)",
            ),
        ]
        return summary(rows)


def _float(x) -> float | None:
    return None if x is None else float(x)
