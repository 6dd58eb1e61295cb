"""One update (and one validation pass) through DeepSpeed's pipeline engine.

Every stream of every micro-batch of the step (v1, and v2 where the micro-batch has one) is one pipeline
micro-batch, so the engine runs as many as the step has streams; the stages of a pipeline load the same rows and
agree on that number. The loss is the one of loss.py: the last stage turns each stream's logits into its share of
the step loss, normalised by the step's global token counts, which travel with the labels.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ofa_ds.config import ModelConfig
from ofa_ds.data.collate import model_inputs
from ofa_ds.parallel.groups import Groups
from ofa_ds.parallel.pipeline import stream_inputs
from ofa_ds.train.loss import STREAMS, task_sums, weighted_sum


class PipelineLoss:
    """The pipeline module's loss_fn: logits (B, T, V or V / T) and labels (target, weights, task ids, global token
    counts (2,), stream index) -> this stream's share of the step loss, scaled for DeepSpeed (which divides by the
    configured accumulation and averages over data-parallel ranks). Records the unscaled shares and per-task sums,
    or in eval mode the validation sums."""

    def __init__(self, nll_fn, pad: int, num_tasks: int, scale: float):
        self.nll_fn, self.pad, self.num_tasks, self.scale = nll_fn, pad, num_tasks, scale
        self.reset(train=True)

    def reset(self, train: bool) -> None:
        self.train = train
        self.parts = torch.zeros(2, dtype=torch.float64)
        self.tasks = torch.zeros(2, self.num_tasks, dtype=torch.float64)
        self.sums = torch.zeros(2, 2 + self.num_tasks, dtype=torch.float64)

    def __call__(self, logits, labels):
        target, weights, task_ids, n_tokens, stream = labels
        i = int(stream)
        nll = self.nll_fn(logits, target, self.pad)
        x = {"target": target, "task_ids": task_ids}
        total = weighted_sum(nll, weights)
        if not self.train:
            self.sums[0, i] += float(total)
            self.sums[1, i] += float(target.ne(self.pad).sum())
            self.sums[:, 2:] += task_sums(nll, x, self.num_tasks, self.pad).cpu()
            return total.detach()
        share = total / float(n_tokens[i])
        self.parts[i] += float(share)
        self.tasks += task_sums(nll, x, self.num_tasks, self.pad).cpu()
        return share * self.scale


def _pipeline_batches(micro_batches, device, dtype, n_tokens) -> list:
    out = []
    for b in micro_batches:
        for i, s in enumerate(STREAMS):
            if b.get(s) is not None:
                x = model_inputs(b[s], device, dtype)
                labels = (x["target"], x["weights"], x["task_ids"], n_tokens, torch.tensor(i))
                out.append((stream_inputs(x), labels))
    return out


def _records(engine, groups: Groups, t: torch.Tensor) -> torch.Tensor:
    """The last stage's records (its TP rank 0's: the others hold the same), summed over data-parallel ranks."""
    mine = t if engine.is_last_stage() and groups.tp_rank == 0 else torch.zeros_like(t)
    mine = mine.to(engine.device)
    dist.all_reduce(mine)
    return mine.cpu()


def train_step(engine, micro_batches, *, model_cfg: ModelConfig, num_tasks: int, groups: Groups, head, dtype):
    """The pipelined update; `head` is the step's global [v1 tokens, v2 tokens, examples, FLOPs]."""
    loss_fn: PipelineLoss = engine.module.loss_fn
    loss_fn.reset(train=True)
    batches = _pipeline_batches(micro_batches, engine.device, dtype, head[:2])
    engine.micro_batches = len(batches)  # the schedule's length this step (DeepSpeed reads it per train_batch)
    engine.train_batch(iter(batches))
    tail = _records(engine, groups, torch.cat([loss_fn.parts, loss_fn.tasks.flatten()]))
    return tail[:2], tail[2:].view(2, num_tasks)


@torch.no_grad()
def eval_sums(engine, micro_batches, *, num_tasks: int, groups: Groups, dtype) -> torch.Tensor:
    loss_fn: PipelineLoss = engine.module.loss_fn
    loss_fn.reset(train=False)
    batches = _pipeline_batches(micro_batches, engine.device, dtype, torch.zeros(2, dtype=torch.float64))
    engine.eval_batch(iter(batches), num_micro_batches=len(batches))
    return _records(engine, groups, loss_fn.sums)


__all__ = ["PipelineLoss", "train_step", "eval_sums"]
