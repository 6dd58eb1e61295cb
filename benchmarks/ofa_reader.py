"""OFA's way of reading its TSVs and building batches (OFA_SPEC 5.2), the baseline benchmarks/dataloader.py measures
ofa_ds's loader against: OFA's line-offset table, row parsers, transform chain and collation (what its
docstring's `ofa_tsv` mode describes)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path


class OFATable:
    """data/file_dataset.py: offsets of every line at start; reads the next line whatever index is asked."""

    def __init__(self, path: Path, parse):
        self.offsets, offset = [], 0
        with open(path) as fp:
            for line in fp:
                self.offsets.append(offset)
                offset += len(line.encode("utf-8"))
        self.path, self.parse, self.count = path, parse, 0
        self.fp = open(path)

    def __len__(self):
        return len(self.offsets)

    def __getitem__(self, index):
        if self.count == len(self.offsets):
            self.fp, self.count = open(self.path), 0
        cols = self.fp.readline().rstrip("\n").split("\t")
        self.count += 1
        return self.parse(cols)


def _b64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s)


def _parse_vl(c):
    uid, image, caption, question, refs, gt, dataset, task = c
    answers = (
        [{"answer": a.split("|!+")[1], "conf": float(a.split("|!+")[0])} for a in refs.split("&&")]
        if task == "qa"
        else []
    )
    box = [float(v) for v in refs.strip().split(",")] if task == "visual_grounding" else None
    return {
        "uniq_id": uid,
        "image": _b64(image),
        "caption": caption,
        "question": question,
        "answers": answers,
        "box": box,
        "gt_objects": gt.strip().split("&&") if gt.strip() else [],
        "dataset_name": dataset,
        "task_type": task,
    }


def _parse_detection(c):
    boxes = []
    for label in c[2].strip().split("&&"):
        x0, y0, x1, y1, cat_id, cat = label.strip().split(",", 5)
        boxes.append(
            {"x0": float(x0), "y0": float(y0), "x1": float(x1), "y1": float(y1), "category_id": cat_id, "label": cat}
        )
    return {"image_id": c[0], "image": _b64(c[1]), "boxes": boxes}


class OFACorpus:
    def __init__(self, tsv: Path):
        from types import SimpleNamespace

        self.vl = OFATable(tsv / "vision_language_examples.tsv", _parse_vl)
        self.text = OFATable(tsv / "text_examples.tsv", lambda c: {"uniq_id": c[0], "text": c[1]})
        self.image = OFATable(
            tsv / "image_examples.tsv",
            lambda c: {"image_id": c[0], "image": _b64(c[1]), "codes": [int(x) for x in c[2].split()]},
        )
        self.detection = OFATable(tsv / "detection_examples.tsv", _parse_detection)
        neg = tsv / "negative_sample"
        lines = lambda f: [r.strip() for r in open(neg / f) if r.strip()]  # noqa: E731
        self.negatives = SimpleNamespace(
            captions=lines("all_captions.txt"),
            objects=lines("object.txt"),
            type2ans=json.loads((neg / "type2ans.json").read_text()),
        )


def ofa_transforms():
    """OFA's transform chain shapes (utils/transforms.py, torchvision): whole-image resize, then crop."""
    from types import SimpleNamespace

    import numpy as np
    import torch
    from PIL import Image

    from ofa_ds.data import transforms as T

    def to_tensor(img):  # torchvision ToTensor + Normalize(0.5, 0.5)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous().float().div(255)
        return x.sub_(0.5).div_(0.5).numpy()

    def decode(data):
        return Image.open(io.BytesIO(data)).convert("RGB")

    def resized(img, r, rng):
        size = int(rng.integers(r, r * 5 // 4 + 1))
        ow, oh = T.resize_shorter(*img.size, size, r * 7 // 4)
        return img.resize((ow, oh), Image.BICUBIC)

    def caption_image(data, r, rng):
        img = resized(decode(data), r, rng)
        top, left = int(round((img.size[1] - r) / 2.0)), int(round((img.size[0] - r) / 2.0))
        img = img.crop((left, top, left + r, top + r))
        img = Image.fromarray(np.array(img))  # RandomAugment(isPIL=True) works on np.array(img)
        return to_tensor(T.rand_augment(img, rng))

    def grounding_image(data, box, r, rng):
        img = decode(data)
        w, h = img.size
        img = resized(img, r, rng)
        ow, oh = img.size
        b = np.asarray(box, dtype=np.float32) * np.array([ow / w, oh / h, ow / w, oh / h], dtype=np.float32)
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        left = max(cx - r / 2 + min(ow - cx - r / 2, 0), 0)
        top = max(cy - r / 2 + min(oh - cy - r / 2, 0), 0)
        img = img.crop((left, top, left + r, top + r))
        b = np.clip(b - np.array([left, top, left, top], dtype=np.float32), 0, r)
        return to_tensor(img), b

    def detection_image(data, boxes, s, rng):
        img = decode(data)
        w, h = img.size
        b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            b = b[:, [2, 1, 0, 3]] * np.array([-1, 1, -1, 1], np.float32) + np.array([w, 0, w, 0], np.float32)
        target = round((rng.random() * 0.5 + 1.0) * s)
        scale = max(target / h, target / w)
        sh, sw = round(h * scale), round(w * scale)
        img = img.resize((sw, sh), Image.BICUBIC)
        b = b * np.array([sw / w, sh / h, sw / w, sh / h], dtype=np.float32)
        top, left = (int(v) for v in np.floor(np.array([sh - s, sw - s]) * rng.random(2)))
        img = img.crop((left, top, left + s, top + s))
        b = np.clip(np.minimum(b - np.array([left, top, left, top], np.float32), s), 0, None)
        keep = np.flatnonzero((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]))
        return to_tensor(img), b[keep], keep

    def infilling_image(data, s):
        x = to_tensor(decode(data))
        x[:, s // 4 : 3 * s // 4, s // 4 : 3 * s // 4] = 0
        return x

    return SimpleNamespace(
        caption_image=caption_image,
        grounding_image=grounding_image,
        detection_image=detection_image,
        infilling_image=infilling_image,
        infilling_hole=T.infilling_hole,
        quantize=T.quantize,
    )


def ofa_collate(examples, image_size, pad):
    """unify_dataset.collate: stack the per-sample float tensors (zeros made per text example), pad tokens."""
    import numpy as np
    import torch

    from ofa_ds.data.collate import token_fields

    images = [
        torch.from_numpy(e.image) if e.image is not None else torch.zeros(3, image_size, image_size) for e in examples
    ]
    stream = {
        **token_fields(examples, pad),
        "patch_images": torch.stack(images),
        "patch_masks": torch.tensor([e.image is not None for e in examples]),
    }
    if examples[0].patch_idx is not None:
        stream["patch_idx"] = torch.from_numpy(np.stack([e.patch_idx for e in examples]))
    return stream
