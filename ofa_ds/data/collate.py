"""Examples -> one Stream of the batch format (DESIGN.md "Batch format").

    src_tokens (B, L) long, prev_output_tokens (B, T) long, target (B, T) long: right-padded with pad,
        L and T rounded up to a multiple of 8
    patch_images (B, 3, R, R) float: pixels normalised to [-1, 1] (ToTensor + Normalize(0.5, 0.5)); zeros where
        there is no image and in an example's `hole`; patch_masks (B,) bool
    code_masks (B,) bool, weights (B,) float, task_ids (B,) long
    patch_idx (B, K) long: only when the examples carry a patch sample (v1 with sample_patch_num < patches)
"""
from __future__ import annotations

import numpy as np
import torch

from ofa_ds.data.tasks import Example
from ofa_ds.data.transforms import normalise_

PAD_MULTIPLE = 8


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad(seqs: list[list[int]], length: int, pad: int) -> torch.Tensor:
    out = np.full((len(seqs), length), pad, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return torch.from_numpy(out)


def _empty_images(b: int, r: int) -> torch.Tensor:
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(b, 3, r, r)
    # In a DataLoader worker allocate in shared memory, as torch's default_collate does: handing the batch to the
    # trainer process then sends a handle instead of copying tens of MB into new shared memory.
    storage = torch.empty(0)._typed_storage()._new_shared(b * 3 * r * r)
    return torch.empty(0).new(storage).resize_(b, 3, r, r)


def collate(examples: list[Example], image_size: int, pad: int) -> dict[str, torch.Tensor]:
    b = len(examples)
    images = _empty_images(b, image_size)
    slot_of = {}  # id(pixels) -> slot already holding them normalised: a VL row's two examples share one image
    for i, e in enumerate(examples):
        if e.image is None:
            images[i].zero_()
            continue
        if e.image.shape != (3, image_size, image_size):
            raise ValueError(f"example {i} (task {e.task}): image {e.image.shape}, stream images are {image_size}")
        j = slot_of.setdefault(id(e.image), i)
        if j == i:
            normalise_(images[i].copy_(torch.from_numpy(e.image)))
        else:
            images[i].copy_(images[j])
        if e.hole is not None:
            x0, y0, x1, y1 = e.hole
            images[i, :, y0:y1, x0:x1] = 0
    stream = {**token_fields(examples, pad), "patch_images": images,
              "patch_masks": torch.tensor([e.image is not None for e in examples])}
    sampled = [e.patch_idx is not None for e in examples]
    if any(sampled):
        if not all(sampled):
            raise ValueError("some examples of a stream carry patch_idx and some do not")
        stream["patch_idx"] = torch.from_numpy(np.stack([e.patch_idx for e in examples]).astype(np.int64))
    return stream


def token_fields(examples: list[Example], pad: int) -> dict[str, torch.Tensor]:
    """Everything of a Stream except the images: padded token tensors and per-example fields."""
    src_len = _round_up(max(len(e.source) for e in examples), PAD_MULTIPLE)
    tgt_len = _round_up(max(len(e.target) for e in examples), PAD_MULTIPLE)
    return {
        "src_tokens": _pad([e.source for e in examples], src_len, pad),
        "prev_output_tokens": _pad([e.prev_output for e in examples], tgt_len, pad),
        "target": _pad([e.target for e in examples], tgt_len, pad),
        "code_masks": torch.tensor([e.code_mask for e in examples]),
        "weights": torch.tensor([e.weight for e in examples], dtype=torch.float32),
        "task_ids": torch.tensor([e.task for e in examples], dtype=torch.long),
    }
