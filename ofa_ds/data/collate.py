"""Examples -> one Stream of the batch format (DESIGN.md "Batch format"), and a Stream -> the model's inputs.

    src_tokens (B, L) long, prev_output_tokens (B, T) long, target (B, T) long: right-padded with pad,
        L and T rounded up to a multiple of 8
    patch_images (N, 3, R, R) uint8: the N distinct images of the stream, RGB pixels (a zero image for examples
        without one); image_index (B,) long: the row of patch_images each example uses (a VL row's two examples
        share their image); patch_masks (B,) bool
    patch_holes (B, 4) long: (x0, y0, x1, y1) of the region image infilling blanks; all 0 for no hole
    code_masks (B,) bool, weights (B,) float, task_ids (B,) long
    patch_idx (B, K) long: only when the examples carry a patch sample (v1 with sample_patch_num < patches)

Images travel as uint8, each distinct image once, and are normalised where the model runs (`model_inputs`): an
eighth of the bytes of float32 images per example through the loader workers' shared memory (whose page faults cost
the workers more than the copies) and the host-to-device copy, and no float work in the workers. The model gets
them still shared (image_index), so its ResNet runs once per distinct image.
"""

from __future__ import annotations

import numpy as np
import torch

from ofa_ds.config import TEXT_PAD_MULTIPLE
from ofa_ds.data.tasks import Example
from ofa_ds.data.transforms import planar_into


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad(seqs: list[list[int]], length: int, pad: int) -> torch.Tensor:
    out = np.full((len(seqs), length), pad, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return torch.from_numpy(out)


def _empty_images(b: int, r: int) -> torch.Tensor:
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(b, 3, r, r, dtype=torch.uint8)
    # In a DataLoader worker allocate in shared memory, as torch's default_collate does: handing the batch to the
    # trainer process then sends a handle instead of copying the images into new shared memory.
    storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(b * 3 * r * r)
    return torch.empty(0, dtype=torch.uint8).new(storage).resize_(b, 3, r, r)


def collate(examples: list[Example], image_size: int, pad: int) -> dict[str, torch.Tensor]:
    rows: dict[int, int] = {}  # id of an example's image array (0: no image) -> its row of patch_images
    distinct, index = [], []  # the image (or None) of each row; each example's row
    for i, e in enumerate(examples):
        if e.image is not None and e.image.shape != (3, image_size, image_size):
            raise ValueError(f"example {i} (task {e.task}): image {e.image.shape}, stream images are {image_size}")
        key = 0 if e.image is None else id(e.image)
        if key not in rows:
            rows[key] = len(distinct)
            distinct.append(e.image)
        index.append(rows[key])
    images = _empty_images(len(distinct), image_size)
    for row, image in enumerate(distinct):
        if image is None:
            images[row].zero_()
        else:
            planar_into(images[row].numpy(), image)
    stream = {
        **token_fields(examples, pad),
        "patch_images": images,
        "image_index": torch.tensor(index),
        "patch_holes": torch.tensor([e.hole or (0, 0, 0, 0) for e in examples], dtype=torch.long),
        "patch_masks": torch.tensor([e.image is not None for e in examples]),
    }
    sampled = [e.patch_idx is not None for e in examples]
    if any(sampled):
        if not all(sampled):
            raise ValueError("some examples of a stream carry patch_idx and some do not")
        stream["patch_idx"] = torch.from_numpy(np.stack([e.patch_idx for e in examples]).astype(np.int64))
    return stream


def distinct_images(stream: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The images the model's ResNet runs on: keys (N', 5) long, each (row of patch_images, hole x0, y0, x1, y1),
    one per distinct (image, hole) pair of the examples with an image (patch_masks), and each example's index (B,)
    into them. An example without an image points at key 0 (its patches are padding); a stream without any image
    keeps one image blanked whole, so that its encoder sequence keeps the image positions."""
    has_image = stream["patch_masks"]  # (B,)
    keys = torch.cat([stream["image_index"][:, None], stream["patch_holes"]], 1)  # (B, 5)
    index = torch.zeros_like(stream["image_index"])
    if not bool(has_image.any()):
        r = stream["patch_images"].shape[-1]
        return keys.new_tensor([[0, 0, 0, r, r]]), index
    keys, inverse = torch.unique(keys[has_image], dim=0, return_inverse=True)  # (N', 5), (examples with one,)
    index[has_image] = inverse
    return keys, index


def model_inputs(stream: dict[str, torch.Tensor], device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A loader Stream on `device` as the model takes it: patch_images (N', 3, R, R), the distinct images of
    `distinct_images` with their holes, normalised as OFA's ToTensor + Normalize(0.5, 0.5) (bit for bit, in float32)
    and then cast to `dtype`, the holes 0 after normalisation; image_index (B,) each example's row of them."""
    if stream["patch_images"].dtype != torch.uint8:
        raise TypeError(
            f"patch_images are {stream['patch_images'].dtype}; model_inputs takes the loader's uint8 pixels"
        )
    keys, index = distinct_images(stream)
    skip = ("patch_images", "patch_holes", "image_index")
    out = {k: v.to(device, non_blocking=True) for k, v in stream.items() if k not in skip}
    keys = keys.to(device, non_blocking=True)
    images = stream["patch_images"].to(device, non_blocking=True)  # (N, 3, R, R) uint8
    x = images[keys[:, 0]].float().div_(255).sub_(0.5).div_(0.5)  # (N', 3, R, R)
    r = torch.arange(x.shape[-1], device=x.device)
    x0, y0, x1, y1 = keys[:, 1:].unbind(1)  # (N',) each
    rows = (r >= y0[:, None]) & (r < y1[:, None])  # (N', R)
    cols = (r >= x0[:, None]) & (r < x1[:, None])  # (N', R)
    hole = rows[:, :, None] & cols[:, None, :]  # (N', R, R)
    out["patch_images"] = x.masked_fill_(hole[:, None], 0).to(dtype)
    out["image_index"] = index.to(device, non_blocking=True)
    return out


def token_fields(examples: list[Example], pad: int) -> dict[str, torch.Tensor]:
    """Everything of a Stream except the images: padded token tensors and per-example fields."""
    src_len = _round_up(max(len(e.source) for e in examples), TEXT_PAD_MULTIPLE)
    tgt_len = _round_up(max(len(e.target) for e in examples), TEXT_PAD_MULTIPLE)
    return {
        "src_tokens": _pad([e.source for e in examples], src_len, pad),
        "prev_output_tokens": _pad([e.prev_output for e in examples], tgt_len, pad),
        "target": _pad([e.target for e in examples], tgt_len, pad),
        "code_masks": torch.tensor([e.code_mask for e in examples]),
        "weights": torch.tensor([e.weight for e in examples], dtype=torch.float32),
        "task_ids": torch.tensor([e.task for e in examples], dtype=torch.long),
    }
