"""OFA's pretraining loss (OFA_SPEC 6), normalised explicitly over the global batch.

    loss = sum_v1(conf * nll) / n_v1 + sum_v2(conf * nll) / n_v2

n_v1 and n_v2 are the non-pad target tokens of each stream over the whole step (every micro-batch of every
data-parallel rank), counted before the forward passes. Each micro-batch contributes its share
`micro_loss(...)`; the step's loss and gradient are the sums of those shares over micro-batches and ranks,
whatever the split. A step without any v2 example is `sum_v1 / n_v1` alone, as OFA.

`token_nll` is the only function that sees the vocabulary dimension: a vocabulary-parallel cross-entropy
(same inputs, logits sharded over V) replaces it without touching the rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

STREAMS = ("v1", "v2")


def token_nll(logits: torch.Tensor, target: torch.Tensor, pad: int) -> torch.Tensor:
    """-log p(target) per token, fp32, 0 at pad targets: logits (B, T, V), target (B, T) -> (B, T)."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=pad, reduction="none")
    return nll.view_as(target)


def count_tokens(batch: dict, pad: int) -> torch.Tensor:
    """Non-pad target tokens of each stream of one micro-batch: (2,) float64 [v1, v2]."""
    return torch.tensor(
        [0.0 if batch.get(s) is None else float(batch[s]["target"].ne(pad).sum()) for s in STREAMS], dtype=torch.float64
    )


def weighted_sum(nll: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum over tokens of conf * nll; nll (B, T) is already 0 at pads, weights (B,) is OFA's per-example conf."""
    return (nll * weights.to(nll.dtype)[:, None]).sum()


def stream_share(nll: torch.Tensor, weights: torch.Tensor, n_tokens: float) -> torch.Tensor:
    """One stream's share of the step loss: sum(conf * nll) / the stream's global non-pad target tokens."""
    return weighted_sum(nll, weights) / float(n_tokens)


def micro_loss(nll: dict, batch: dict, n_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This micro-batch's share of the step loss, and its per-stream parts (2,) (detached).

    nll: {"v1": (B1, T1), "v2": (B2, T2) or absent}; n_tokens: (2,) global non-pad counts of the step.
    """
    parts = []
    for i, s in enumerate(STREAMS):
        if batch.get(s) is None or n_tokens[i] == 0:
            parts.append(nll["v1"].new_zeros(()))
        else:
            parts.append(stream_share(nll[s], batch[s]["weights"], n_tokens[i]))
    return parts[0] + parts[1], torch.stack([p.detach() for p in parts])


def task_sums(nll: torch.Tensor, stream: dict, num_tasks: int, pad: int) -> torch.Tensor:
    """Per-task (unweighted) nll sums and target-token counts of one stream: (2, num_tasks) float64."""
    mask = stream["target"].ne(pad)
    tasks = stream["task_ids"][:, None].expand_as(mask)[mask]
    out = torch.zeros(2, num_tasks, dtype=torch.float64, device=nll.device)
    out[0].index_add_(0, tasks, nll.detach()[mask].double())
    out[1].index_add_(0, tasks, torch.ones_like(tasks, dtype=torch.float64))
    return out


__all__ = ["STREAMS", "token_nll", "count_tokens", "weighted_sum", "stream_share", "micro_loss", "task_sums"]
