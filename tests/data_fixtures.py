"""Hand-built corpus rows (the row format of ofa_ds.data.shards.Corpus) for the data tests."""

from __future__ import annotations

import io
from types import SimpleNamespace

from PIL import Image, ImageDraw


def encode_image(w: int, h: int, *, fmt: str = "PNG", bg=(40, 70, 215), box=None, fg=(215, 40, 40)) -> bytes:
    """A flat image, optionally with a filled rectangle `box` (x0, y0, x1, y1)."""
    img = Image.new("RGB", (w, h), bg)
    if box is not None:
        ImageDraw.Draw(img).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=fg)
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def vl_row(
    task_type: str,
    *,
    uid="r0",
    image=None,
    caption="",
    question="",
    answers=(),
    box=None,
    gt_objects=(),
    dataset_name="coco",
) -> dict:
    return {
        "uniq_id": uid,
        "image": image or encode_image(96, 64),
        "caption": caption,
        "question": question,
        "answers": [{"answer": a, "conf": c} for a, c in answers],
        "box": box,
        "gt_objects": list(gt_objects),
        "dataset_name": dataset_name,
        "task_type": task_type,
    }


def negatives(
    captions=("a dog on a sofa", "two cats"), objects=("dog", "cat", "bird"), type2ans=None
) -> SimpleNamespace:
    type2ans = type2ans or {
        "how many": ["1", "2", "3"],
        "color": ["red", "blue", "green"],
        "other": ["pizza", "tennis", "kite"],
    }
    return SimpleNamespace(captions=list(captions), objects=list(objects), type2ans=type2ans)


def corpus(vl=(), text=(), image=(), detection=(), neg=None) -> SimpleNamespace:
    return SimpleNamespace(
        vl=list(vl), text=list(text), image=list(image), detection=list(detection), negatives=neg or negatives()
    )


def small_corpus(n_vl: int = 24) -> SimpleNamespace:
    """A mix of all row types; images are small so that batches build fast at small image sizes."""
    vl = []
    for i in range(n_vl):
        kind = ("caption", "qa", "visual_grounding")[i % 3]
        img = encode_image(48 + 8 * (i % 4), 40 + 4 * (i % 5), fmt="JPEG" if i % 2 else "PNG", box=(8, 8, 30, 24))
        vl.append(
            vl_row(
                kind,
                uid=f"vl{i}",
                image=img,
                caption=f"A red box number {i} on blue",
                question="what color is the box?",
                answers=[("red", 1.0), ("blue", 0.3)] if kind == "qa" else (),
                box=[8.0, 8.0, 30.0, 24.0] if kind == "visual_grounding" else None,
                gt_objects=["box"] if kind == "caption" else (),
                dataset_name="cc12m" if i % 4 == 0 else "coco",
            )
        )
    text = [
        {"uniq_id": f"t{i}", "text": f"Document {i}: the quick brown fox jumps over the lazy dog again and again."}
        for i in range(5)
    ]
    image = [
        {"image_id": f"i{i}", "image": encode_image(32, 32, bg=(10 * i, 100, 50)), "codes": [i] * 256} for i in range(3)
    ]
    detection = [
        {
            "image_id": f"d{i}",
            "image": encode_image(60, 50, box=(10, 10, 40, 30)),
            "boxes": [{"x0": 10.0, "y0": 10.0, "x1": 40.0, "y1": 30.0, "category_id": "1", "label": "Red Box"}],
        }
        for i in range(2)
    ]
    return corpus(vl, text, image, detection)
