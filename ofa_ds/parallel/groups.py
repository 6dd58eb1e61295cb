"""The one place that builds the process groups of a layout: tensor (TP), pipeline (PP) and data (DP) parallel.

    groups = build(parallel)        # after the world process group exists; every rank calls it
    groups.dp_rank, groups.dp_size  # the data loader's shard; gradients are averaged over groups.dp_group
    groups.mpu                      # what deepspeed.initialize(mpu=...) needs

Ranks are laid out as Megatron lays them out: TP fastest (consecutive ranks, a node's GPUs), then DP, then PP, so
rank = tp + T * (dp + D * pp). megatron-core's parallel_state builds the groups; a layout without model parallelism
uses the world as its data-parallel group and never imports megatron-core.
"""

from __future__ import annotations

import socket
import warnings
from dataclasses import dataclass

import torch.distributed as dist

from ofa_ds.config import ParallelConfig


def parallel_state():
    """megatron-core's parallel_state, imported without its warnings about optional fused kernels (Transformer
    Engine, Apex) that ofa-ds does not use."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
        from megatron.core import parallel_state as ps
    return ps


class MPU:
    """megatron-core's parallel_state as DeepSpeed's `mpu`. DeepSpeed asks for the "model parallel" rank, size and
    group (checkpoint names, ZeRO's gradient-norm reduction) by names parallel_state lacks; without an mpu it would
    take TP ranks for DP ranks and average their different gradients. Model parallel here means tensor parallel:
    the pipeline engine brings its own grid."""

    def __init__(self, ps):
        self._ps = ps

    def get_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def __getattr__(self, name):
        return getattr(self._ps, name)


@dataclass
class Groups:
    layout: ParallelConfig
    world: int
    tp_rank: int
    tp_size: int
    tp_group: object  # None when tp_size == 1
    dp_rank: int
    dp_size: int
    dp_group: object  # None: the world
    pp_rank: int
    pp_size: int
    mpu: MPU | None  # None without model parallelism

    def dp_ranks(self) -> list[list[int]]:
        """Every data-parallel group's global ranks (rank = tp + T * (dp + D * pp))."""
        t, d = self.tp_size, self.dp_size
        return [[tp + t * (dp + d * pp) for dp in range(d)] for pp in range(self.pp_size) for tp in range(t)]


def build(layout: ParallelConfig) -> Groups:
    world, rank = dist.get_world_size(), dist.get_rank()
    dp = layout.data_parallel(world)
    t, p = layout.tensor, layout.pipeline
    if t == p == 1:
        return Groups(layout, world, 0, 1, None, rank, world, None, 0, 1, None)
    ps = parallel_state()
    # gloo is the CPU backend already; megatron-core's extra gloo copies of its groups would only cost sockets.
    ps.initialize_model_parallel(
        tensor_model_parallel_size=t, pipeline_model_parallel_size=p, create_gloo_process_groups=False
    )
    assert ps.get_tensor_model_parallel_rank() == rank % t and ps.get_data_parallel_rank() == (rank // t) % dp
    return Groups(
        layout,
        world,
        ps.get_tensor_model_parallel_rank(),
        t,
        ps.get_tensor_model_parallel_group(),
        ps.get_data_parallel_rank(),
        dp,
        ps.get_data_parallel_group(),
        ps.get_pipeline_model_parallel_rank(),
        p,
        MPU(ps),
    )


def ranks_by_host(hosts: list[str]) -> list[list[int]]:
    """Ranks grouped by the host they run on, in order of each host's first rank."""
    nodes: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        nodes.setdefault(host, []).append(rank)
    return list(nodes.values())


def node_group(members: list[list[int]]):
    """The process group of this rank's node within its set of `members` (a partition of the world: its data-parallel
    group, for sync_node BatchNorm): every rank creates every group, in the same order, as torch requires."""
    hosts = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    mine = None
    for ranks in members:
        for node in ranks_by_host([hosts[r] for r in ranks]):
            node = [ranks[i] for i in node]
            group = dist.new_group(node)
            if dist.get_rank() in node:
                mine = group
    return mine


def destroy() -> None:
    """Forget megatron-core's groups (its state is module-global), e.g. between runs in one process."""
    import sys

    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


__all__ = ["Groups", "MPU", "build", "ranks_by_host", "node_group", "destroy", "parallel_state"]
