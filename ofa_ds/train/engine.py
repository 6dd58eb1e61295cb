"""The DeepSpeed side of pretraining: process group, model construction, one update (the JSON: ds_json.py).

DeepSpeed picks its fused Adam on GPUs and its CPU Adam with optimizer offload.

Data-parallel gradients: each micro-batch's loss is already its share of the global step loss (loss.py),
so gradients must be summed over micro-batches and ranks. DeepSpeed averages over ranks, hence the
backward of `dp_size * loss` without its 1 / accumulation scaling.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from ofa_ds.config import ModelConfig
from ofa_ds.data.collate import model_inputs
from ofa_ds.model.ofa import OFAModel
from ofa_ds.model.resnet import BatchNorm2d
from ofa_ds.parallel import checkpointing
from ofa_ds.parallel.groups import Groups, node_group
from ofa_ds.parallel.tensor import parallelize, shard
from ofa_ds.parallel.tensor import token_nll as tensor_parallel_nll
from ofa_ds.train.ds_json import zero_stage
from ofa_ds.train.flops import stream_shape, train_flops
from ofa_ds.train.loss import STREAMS, count_tokens, stream_share, task_sums, token_nll, weighted_sum

# ---------------------------------------------------------------------------------------------------- processes


# Rank, world-size and local-rank variables of the launchers: deepspeed / torchrun, OpenMPI, MPICH / Intel MPI
# (PMI), and Slurm's srun for the local rank.
_RANK_ENV = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
_SIZE_ENV = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
_LOCAL_RANK_ENV = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")


def world_size() -> int:
    """From the launcher's environment (no launcher: 1), before any process group exists."""
    return next((int(os.environ[k]) for k in _SIZE_ENV if k in os.environ), 1)


def local_rank() -> int:
    """This process's rank on its node, from whichever launcher started it (none: 0): the GPU it uses."""
    return next((int(os.environ[k]) for k in _LOCAL_RANK_ENV if k in os.environ), 0)


def init_distributed() -> str:
    """Start the process group: nccl on GPUs, gloo on CPU. Without a launcher, a group of one process."""
    if not any(k in os.environ for k in _RANK_ENV):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # DeepSpeed's engine reads LOCAL_RANK for its device: under mpirun / srun only the launcher's own name is set.
    os.environ.setdefault("LOCAL_RANK", str(local_rank()))
    acc = get_accelerator()
    backend = "nccl" if acc.device_name() == "cuda" else "gloo"
    if backend == "nccl":
        acc.set_device(local_rank())
    elif "OMP_NUM_THREADS" not in os.environ:
        cpu_threads_per_rank()
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    if backend == "gloo":
        release_shm_name()
    return backend


def release_shm_name() -> None:
    """DeepSpeed's CPU all-reduce, when every rank is on one node, maps one /dev/shm segment per rank (69 MB, named
    by user, master address and port) and never unlinks it: each CPU run would leave them behind until the node
    runs out of memory. Once every rank has mapped every segment (init_distributed has returned on all ranks: a
    barrier), a rank's name can go; the mappings stay."""
    dist.barrier()
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{dist.get_rank()}"
    Path("/dev/shm", name).unlink(missing_ok=True)


def cpu_threads_per_rank() -> int:
    """CPU ranks without OMP_NUM_THREADS (the deepspeed launcher does not set it) share the node's cores instead
    of each taking all of them: oversubscribed gloo ranks run 20-100x slower."""
    ranks = next(
        (
            int(os.environ[k])
            for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")
            if k in os.environ
        ),
        world_size(),
    )
    threads = max(1, (os.cpu_count() or 1) // ranks)
    torch.set_num_threads(threads)
    return threads


class KernelMismatch(RuntimeError):
    pass


def kernels_in_use(cfg: ModelConfig, device: torch.device) -> dict:
    """The kernels this process will run: they depend on its node (a CUDA extension that failed to build, Triton
    missing, OFA_DS_ATTENTION set), so every rank reports its own."""
    from ofa_ds.kernels.attention import resolve_backend
    from ofa_ds.kernels.resnet import extension_available

    probe = torch.empty(0, device=device)
    return {
        "attention": resolve_backend(cfg.attn_backend, probe),
        "resnet": "cuda" if probe.is_cuda and extension_available() else "torch",
    }


def agree_on_kernels(cfg: ModelConfig, device: torch.device) -> dict:
    """Every rank's kernels, which must be the same: ranks on different code paths would train a model that no
    single configuration describes (and sync BatchNorm would mix two implementations)."""
    mine = kernels_in_use(cfg, device)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (mine, socket.gethostname()))
    if any(kernels != everyone[0][0] for kernels, _ in everyone):
        lines = [
            f"rank {r} on {host}: attention {k['attention']}, resnet {k['resnet']}"
            for r, (k, host) in enumerate(everyone)
        ]
        raise KernelMismatch(
            "ranks would run different kernels (a node's CUDA extension or Triton differs, or "
            "OFA_DS_ATTENTION is set on some nodes only); make the nodes alike or force one backend "
            "with model_overrides.attn_backend:\n  " + "\n  ".join(lines)
        )
    return mine


# ---------------------------------------------------------------------------------------------------- model


def build_model(cfg: ModelConfig, ds: dict, seed: int, groups: Groups, checkpoint_every: int = 0) -> OFAModel:
    """The model on this rank. Without tensor parallelism, partitioned across ranks while it is built under ZeRO-3
    (deepspeed.zero.Init); with it, built whole from the same seed on every rank and then sliced (parallel/tensor.py),
    so that TP=N starts from TP=1's weights; ZeRO-3 partitions the slices at initialize. ZeRO-3 gathers each
    module's parameters around its forward and backward and is told of the few a module reads from a child.
    Pipeline stages are cut from it afterwards (as_pipeline). Every `checkpoint_every`-th layer of each stack
    recomputes its activations in the backward (parallel/checkpointing.py)."""
    torch.manual_seed(seed)
    partition = zero_stage(ds) == 3 and groups.tp_size == 1
    with deepspeed.zero.Init(config_dict_or_path=ds) if partition else contextlib.nullcontext():
        model = OFAModel(cfg)
    if partition:
        model.embed_tokens.tie = False  # its aliases would keep the gathered weight for the whole step
    parallelize(model, groups)
    checkpointing.apply(model, checkpoint_every)
    if zero_stage(ds) == 3:
        for module, param in model.external_parameters():
            deepspeed.zero.register_external_parameter(module, param)
    if cfg.bn_mode in ("sync", "sync_node"):
        # over data-parallel ranks only: the ranks of a TP group hold the same images
        group = node_group(groups.dp_ranks()) if cfg.bn_mode == "sync_node" else groups.dp_group
        for m in model.modules():
            if isinstance(m, BatchNorm2d):
                m.sync_group = group
    return model


def as_pipeline(model: OFAModel, ds: dict, groups: Groups, num_tasks: int):
    """The deepspeed.pipe module of this rank's stage over the (initialised) model, with loss.py's loss."""
    from ofa_ds.parallel.pipeline import pipeline_module
    from ofa_ds.train.pipe_step import PipelineLoss

    # DeepSpeed divides the loss by the configured accumulation and averages over data-parallel ranks
    scale = groups.dp_size * ds["gradient_accumulation_steps"]
    loss = PipelineLoss(nll_function(groups), model.cfg.pad_id, num_tasks, scale)
    return pipeline_module(model, groups, loss, groups.layout.pipeline_partition)


ARCH = (
    "embed_dim",
    "ffn_dim",
    "heads",
    "encoder_layers",
    "decoder_layers",
    "resnet",
    "token_bucket_size",
    "image_bucket_size",
    "max_positions",
)


def init_state_dict(path: str | Path, cfg: ModelConfig) -> dict:
    """Weights to start from: an OFA fairseq checkpoint (through the converter) or an ofa_ds export, of the same
    architecture; the vocabulary is fitted to cfg.vocab_size by OFA's rule (convert.resize_vocab)."""
    from ofa_ds.model.convert import CheckpointError, load_any, resize_vocab

    src, sd = load_any(path)
    diffs = [
        f"{k}: {getattr(src, k)!r} in the checkpoint, {getattr(cfg, k)!r} in this run"
        for k in ARCH
        if getattr(src, k) != getattr(cfg, k)
    ]
    if diffs:
        raise CheckpointError(f"init_from {path} has another architecture:\n  " + "\n  ".join(diffs))
    return resize_vocab(sd, cfg.vocab_size)


def load_init(model: torch.nn.Module, path: str | Path, cfg: ModelConfig, groups: Groups) -> None:
    """Start from `path`: rank 0 alone reads it and scatters the weights (one copy in host memory per run, not per
    rank); a file that does not fit is the same CheckpointError on every rank."""
    from ofa_ds.model.convert import CheckpointError

    sd, error = None, None
    if dist.get_rank() == 0:
        try:
            sd = init_state_dict(path, cfg)
        except CheckpointError as e:
            error = str(e)
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise CheckpointError(box[0])
    load_weights(model, sd, groups)


def load_weights(model: OFAModel, sd: dict | None, groups: Groups | None = None) -> None:
    """Copy a full state dict, given on rank 0 (None elsewhere), into a model on every rank: ZeRO-3 partitions
    take their slice of rank 0's copy, whole tensors are broadcast, and tensor-parallel ranks keep their share of
    them. Without a process group, a plain copy."""
    from ofa_ds.model.convert import check_keys

    rank = dist.get_rank() if dist.is_initialized() else 0
    share = dist.is_initialized() and dist.get_world_size() > 1
    tp, tp_rank = (groups.tp_size, groups.tp_rank) if groups is not None else (1, 0)
    with torch.device("meta"):
        full = OFAModel(model.cfg).state_dict()  # names and full shapes, persistent buffers included
    if rank == 0:
        check_keys(full, sd)
    device = get_accelerator().current_device_name()
    saved = model.state_dict(keep_vars=True)
    buffers = {k: b for k, b in model.named_buffers() if k in saved}  # the persistent ones
    with torch.no_grad():
        for name, p in model.named_parameters():
            if tp > 1:  # not partitioned yet: ZeRO partitions the shares at initialize
                whole = sd[name] if rank == 0 else torch.empty(full[name].shape, dtype=p.dtype)
                if share:
                    _broadcast_into(whole, device)
                p.copy_(shard(name, whole, tp_rank, tp))
                continue
            partitioned = hasattr(p, "ds_id")
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=partitioned):
                if rank == 0:
                    p.data.copy_(sd[name])
            if share and not partitioned:
                _broadcast_into(p.data, device)
        for name, b in buffers.items():
            if rank == 0:
                b.copy_(sd[name])
            if share:
                _broadcast_into(b, device)


def _broadcast_into(t: torch.Tensor, device: str) -> None:
    """Rank 0's values of `t` on every rank (through the accelerator: nccl moves only device memory)."""
    on_device = t.to(device)
    dist.broadcast(on_device, src=0)
    t.copy_(on_device)


def initialize(model: torch.nn.Module, ds: dict, groups: Groups):
    """DeepSpeed's engine over the model; no lr scheduler (the trainer sets each update's rate, schedule.py). With
    tensor parallelism DeepSpeed gets the mpu: ZeRO then averages gradients over the data-parallel group only."""
    mpu = groups.mpu if groups.pp_size == 1 else None  # the pipeline module brings its own grid
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds, mpu=mpu)
    from ofa_ds.train.safe_load import SafeCheckpointEngine

    # DeepSpeed's own engine with loads that run no code from the files (safe_load.py); saves unchanged
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
    return engine


# ---------------------------------------------------------------------------------------------------- one update


@dataclass
class StepStats:
    """Global (all ranks) results of one update."""

    loss: float
    stream_loss: list[float]  # [v1, v2] terms of the loss
    task_nll: torch.Tensor  # (2, num_tasks) float64: unweighted nll sums, target tokens
    tokens: list[float]  # non-pad target tokens [v1, v2]
    examples: float
    flops: float  # analytic training FLOPs of the update over all ranks


def nll_function(groups: Groups):
    """token_nll, or its vocabulary-parallel form when the logits are split over TP ranks."""
    return tensor_parallel_nll if groups.tp_size > 1 else token_nll


def train_step(
    engine,
    micro_batches: list[dict],
    *,
    model_cfg: ModelConfig,
    num_tasks: int,
    groups: Groups,
    times: dict | None = None,
) -> StepStats:
    """One optimizer update over this rank's micro-batches (forward v1 and v2, backward, DeepSpeed step). The ranks
    of a TP group see the same micro-batches and compute the same loss; sums run over the data-parallel group.
    With `times` (the benchmark's), the accelerator is synchronised around each phase and its seconds are added
    under "forward", "backward", "optimizer" (a pipeline's schedule: "pipeline"); each stream's forward-to-backward
    span is appended to times["streams"] as (start, end) in time.time_ns()."""
    pad, dp, nll_fn = model_cfg.pad_id, groups.dp_size, nll_function(groups)
    device, dtype = engine.device, _compute_dtype(engine)
    # Global token counts first: every micro-batch's loss is normalised by them (loss.py).
    shapes = [stream_shape(b[s]) for b in micro_batches for s in STREAMS if b.get(s) is not None]
    head = torch.zeros(4, dtype=torch.float64)  # [v1 tokens, v2 tokens, examples, FLOPs]
    for b in micro_batches:
        head[:2] += count_tokens(b, pad)
    head[2] = sum(s.batch for s in shapes)
    head[3] = train_flops(model_cfg, shapes)
    head = _all_reduce(head, device, groups.dp_group)
    n_tokens = head[:2]
    if groups.pp_size > 1:
        from ofa_ds.train import pipe_step

        t = _lap(times)
        parts, tasks = pipe_step.train_step(
            engine, micro_batches, model_cfg=model_cfg, num_tasks=num_tasks, groups=groups, head=head, dtype=dtype
        )
        _lap(times, "pipeline", t)
        return StepStats(
            loss=float(parts.sum()),
            stream_loss=parts.tolist(),
            task_nll=tasks,
            tokens=n_tokens.tolist(),
            examples=float(head[2]),
            flops=float(head[3]),
        )

    parts = torch.zeros(2, dtype=torch.float64, device=device)
    tasks = torch.zeros(2, num_tasks, dtype=torch.float64, device=device)
    # A backward per stream of each micro-batch: one stream's activations live at a time, and a layer's gradient
    # reaches ZeRO once per backward (also under reentrant activation checkpointing). DeepSpeed is told which backward
    # ends the update (its own count assumes one backward per micro-batch); one step() applies it.
    streams = [(b[s], i) for b in micro_batches for i, s in enumerate(STREAMS) if b.get(s) is not None]
    t = _lap(times)
    for n, (stream, i) in enumerate(streams):
        begin = time.time_ns()
        engine.set_gradient_accumulation_boundary(n == len(streams) - 1)
        x = model_inputs(stream, device, dtype)
        nll = nll_fn(engine(x), x["target"], pad)
        share = stream_share(nll, x["weights"], n_tokens[i])
        t = _lap(times, "forward", t)
        engine.backward(share * dp, scale_wrt_gas=False)
        t = _lap(times, "backward", t)
        if times is not None:
            times.setdefault("streams", []).append((begin, time.time_ns()))
        parts[i] += share.detach().double()
        tasks += task_sums(nll, x, num_tasks, pad)
    engine.step()
    _lap(times, "optimizer", t)
    tail = _all_reduce(torch.cat([parts, tasks.flatten()]), device, groups.dp_group)
    return StepStats(
        loss=float(tail[:2].sum()),
        stream_loss=tail[:2].tolist(),
        task_nll=tail[2:].view(2, num_tasks),
        tokens=n_tokens.tolist(),
        examples=float(head[2]),
        flops=float(head[3]),
    )


def _lap(times: dict | None, phase: str | None = None, since: float = 0.0) -> float:
    """Now (after the accelerator's queued work), adding the seconds since `since` to times[phase]."""
    if times is None:
        return 0.0
    get_accelerator().synchronize()
    now = time.perf_counter()
    if phase is not None:
        times[phase] = times.get(phase, 0.0) + now - since
    return now


@torch.no_grad()
def eval_sums(engine, micro_batches, *, model_cfg: ModelConfig, num_tasks: int, groups: Groups) -> torch.Tensor:
    """Validation sums over all ranks, (2, 2 + num_tasks) float64: row 0 nll sums, row 1 target tokens;
    columns v1 and v2 (conf-weighted, as the loss), then each task (unweighted)."""
    pad, device, dtype = model_cfg.pad_id, engine.device, _compute_dtype(engine)
    if groups.pp_size > 1:
        from ofa_ds.train import pipe_step

        return pipe_step.eval_sums(engine, micro_batches, num_tasks=num_tasks, groups=groups, dtype=dtype)
    out = torch.zeros(2, 2 + num_tasks, dtype=torch.float64, device=device)
    engine.eval()
    for b in micro_batches:
        for i, s in enumerate(STREAMS):
            if b.get(s) is not None:
                x = model_inputs(b[s], device, dtype)
                nll = nll_function(groups)(engine(x), x["target"], pad)
                out[0, i] += weighted_sum(nll, x["weights"]).double()
                out[1, i] += x["target"].ne(pad).sum()
                out[:, 2:] += task_sums(nll, x, num_tasks, pad)
    engine.train()
    return _all_reduce(out, device, groups.dp_group)


def _all_reduce(t: torch.Tensor, device, group) -> torch.Tensor:
    t = t.to(device)
    dist.all_reduce(t, group=group)
    return t.cpu()


def _compute_dtype(engine) -> torch.dtype:
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else torch.float32


def loss_scale(engine) -> float | None:
    return engine.optimizer.loss_scaler.cur_scale if engine.fp16_enabled() else None


__all__ = [
    "world_size",
    "local_rank",
    "init_distributed",
    "cpu_threads_per_rank",
    "KernelMismatch",
    "kernels_in_use",
    "agree_on_kernels",
    "build_model",
    "as_pipeline",
    "init_state_dict",
    "load_init",
    "load_weights",
    "initialize",
    "StepStats",
    "train_step",
    "eval_sums",
    "nll_function",
    "loss_scale",
]
