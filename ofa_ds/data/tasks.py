"""Corpus rows -> training examples for OFA's pretraining tasks (OFA_SPEC 4.2-4.7; unify_dataset.py).

Each VL row gives two examples: caption + caption ITM, VQA + QA ITM, or grounding + grounded captioning. The
extra sources give text infilling, image infilling and detection. Prompts, targets, weights (OFA's `conf`) and
special cases are OFA's; every random choice draws from the numpy Generator passed in, which the loader seeds
per sample. `task_ids` in a batch index `TASKS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ofa_ds.config import DataConfig
from ofa_ds.data import transforms
from ofa_ds.data.masking import mask_spans, poisson_span_pmf
from ofa_ds.data.text import pre_caption, pre_question
from ofa_ds.data.tokenizer import Tokenizer

TASKS = (
    "caption",
    "caption_itm",
    "vqa",
    "qa_itm",
    "grounding",
    "grounded_caption",
    "text_infilling",
    "image_infilling",
    "detection",
)
TASK_ID = {name: i for i, name in enumerate(TASKS)}

TEXT_INFILL_READ = 512  # OFA keeps the first 512 BPE tokens of a document ...
TEXT_INFILL_KEEP = 256  # ... and then the last 256 of those
EXTRA_WEIGHT = 2.0  # conf of text infilling, image infilling and detection
PATCH = 16  # ResNet stages 1-3 downsample by 16: one patch per 16 x 16 pixels


class DataError(ValueError):
    """A corpus row that cannot become an example; the message names the source, row and reason."""


@dataclass
class Example:
    task: int  # index into TASKS
    source: list[int]  # bos ... eos
    target: list[int]  # ... eos; pad where OFA excludes a token from the loss
    prev_output: list[int]  # bos + target tokens without eos
    image: np.ndarray | None  # uint8 (3, R, R) RGB; None: an all-zero (normalised) image with patch_mask False
    weight: float
    code_mask: bool = False
    patch_idx: np.ndarray | None = None  # (K,) v1 patch sample
    hole: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1) set to 0 after normalisation


class TaskBuilder:
    def __init__(self, tokenizer: Tokenizer, cfg: DataConfig, negatives):
        self.tok, self.cfg = tokenizer, cfg
        enc = tokenizer.encode
        self.caption_prompt = enc(" what does the image describe?")
        self.region_prompt = enc("  what does the region describe? region:")
        self.infill_prefix = enc(' what is the complete text of "')
        self.infill_suffix = enc(' "?')
        self.image_prompt = enc(" what is the image in the middle part?")
        self.detection_prompt = enc(" what are the objects in the image?")
        self.yes, self.no = enc(" yes"), enc(" no")
        self.span_pmf = poisson_span_pmf(cfg.poisson_lambda)
        self.num_patches = (cfg.image_size // PATCH) ** 2
        self.captions, self.objects = negatives.captions, negatives.objects
        self.type2ans = negatives.type2ans
        self.ans2type = {a: t for t, answers in self.type2ans.items() if t != "other" for a in answers}

    # ---------------------------------------------------------------------------------------------------- helpers

    def _example(self, task: str, src: list[int], tgt: list[int], image, weight: float, **kw) -> Example:
        bos, eos = self.tok.bos, self.tok.eos
        return Example(TASK_ID[task], [bos, *src, eos], [*tgt, eos], [bos, *tgt], image, weight, **kw)

    def _bins(self, box) -> list[int]:
        bins = transforms.quantize(box, self.cfg.max_image_size, self.cfg.num_bins)
        # Boxes lie inside images of at most max_image_size pixels in OFA's settings; clamp for larger ones.
        return [self.tok.bin_id(min(max(b, 0), self.cfg.num_bins - 1)) for b in bins]

    def _patch_idx(self, rng: np.random.Generator) -> np.ndarray | None:
        k = self.cfg.sample_patch_num
        if k == -1 or k >= self.num_patches:
            return None
        return rng.choice(self.num_patches, size=k, replace=False)  # uniform, no replacement, random order

    # ------------------------------------------------------------------------------------------------ VL tasks

    def vl(self, row: dict, rng: np.random.Generator) -> list[Example]:
        """Two v1 examples from one vision-language row."""
        kind = row["task_type"]
        if kind == "caption":
            pair = self._caption(row, rng)
        elif kind == "qa":
            pair = self._qa(row, rng)
        elif kind == "visual_grounding":
            pair = self._grounding(row, rng)
        else:
            raise DataError(f"task_type {kind!r}; valid: caption, qa, visual_grounding")
        for ex in pair:
            ex.patch_idx = self._patch_idx(rng)
        return pair

    def _caption(self, row, rng) -> list[Example]:
        cfg, enc = self.cfg, self.tok.encode
        image = transforms.caption_image(row["image"], cfg.image_size, rng)
        caption = row["caption"]
        cap = self._example(
            "caption", self.caption_prompt, enc(" " + pre_caption(caption, cfg.max_tgt_length)), image, 1.0
        )
        if row["dataset_name"] == "cc12m":  # OFA drops the first two target tokens from the loss
            cap.target[:2] = [self.tok.pad] * len(cap.target[:2])
            cap.target[-1] = self.tok.eos
        positive = rng.random() >= 0.5
        x = caption if positive else self._negative_caption(caption, row["gt_objects"], rng)
        itm_src = enc(' does the image describe " {} "?'.format(pre_caption(x, cfg.max_src_length)))
        itm = self._example("caption_itm", itm_src, self.yes if positive else self.no, image, 1.0)
        return [cap, itm]

    def _qa(self, row, rng) -> list[Example]:
        cfg, enc = self.cfg, self.tok.encode
        if not row["answers"]:
            raise DataError("qa row without answers")
        image = transforms.caption_image(row["image"], cfg.image_size, rng)
        question = pre_question(row["question"], cfg.max_src_length)
        confs = {}
        for a in row["answers"]:  # a dict as OFA builds it: first position, last confidence of a repeated answer
            confs[a["answer"]] = float(a["conf"])
        answer = max(confs, key=confs.get)
        conf = confs[answer]
        vqa = self._example("vqa", enc(" " + question), enc(" " + answer), image, conf)
        positive = rng.random() >= 0.5
        a = answer if positive else self._negative_answer(answer, conf, rng)
        itm_src = enc(' what is the answer to question " {} ". is " {} "?'.format(question, a))
        itm = self._example("qa_itm", itm_src, self.yes if positive else self.no, image, conf)
        return [vqa, itm]

    def _grounding(self, row, rng) -> list[Example]:
        cfg, enc = self.cfg, self.tok.encode
        if row["box"] is None:
            raise DataError("visual_grounding row without a box")
        image, box = transforms.grounding_image(row["image"], row["box"], cfg.image_size, rng)
        bins = self._bins(box)
        src = enc(
            ' which region does the text " {} " describe?'.format(pre_caption(row["caption"], cfg.max_src_length))
        )
        ground = self._example("grounding", src, bins, image, 1.0)
        tgt = enc(" " + pre_caption(row["caption"], cfg.max_tgt_length))
        region = self._example("grounded_caption", self.region_prompt + bins, tgt, image, 1.0)
        return [ground, region]

    def _negative_caption(self, caption: str, gt_objects: list[str], rng) -> str:
        """OFA_SPEC 4.7: swap a ground-truth object for a random one (u > 0.6), else a random caption."""
        if gt_objects and rng.random() > 0.6:
            gt = gt_objects[rng.integers(len(gt_objects))]
            return caption.replace(gt, _pick_other(self.objects, gt, rng, "negatives.objects"))
        if len(self.captions) == 0:
            raise DataError("the negative caption pool (negatives.captions) is empty; caption ITM needs it")
        return self.captions[int(rng.integers(len(self.captions)))]

    def _negative_answer(self, answer: str, conf: float, rng) -> str:
        """OFA_SPEC 4.7: an answer of the same type (a count +- 1 for some `how many`), else an `other` answer."""
        u = rng.random()
        kind = self.ans2type.get(answer)
        if conf > u + 0.1 and kind is not None:
            if kind == "how many" and answer.isdecimal() and u > 0.5:  # isdecimal: what int() accepts
                return str(int(answer) + (1 if rng.random() < 0.5 else -1))
            return _pick_other(self.type2ans[kind], answer, rng, f"negatives.type2ans[{kind!r}]")
        return _pick_other(self.type2ans.get("other", []), answer, rng, "negatives.type2ans['other']")

    # ------------------------------------------------------------------------------------------------ extras

    def text_infilling(self, row: dict, rng: np.random.Generator) -> Example:
        tok = self.tok
        text = tok.encode_head(" " + row["text"].strip().lower(), TEXT_INFILL_READ)[-TEXT_INFILL_KEEP:]
        full = np.array([tok.bos, *text, tok.eos], dtype=np.int64)
        masked = mask_spans(full, tok.is_word_start(full), tok.mask, self.cfg.mask_ratio, self.span_pmf, rng)
        src = self.infill_prefix + masked[1:-1].tolist() + self.infill_suffix
        return self._example("text_infilling", src, text, None, EXTRA_WEIGHT)

    def image_infilling(self, row: dict) -> Example:
        codes = row["codes"]
        bad = [c for c in codes if not 0 <= c < self.tok.num_codes]
        if bad:
            raise DataError(f"image code {bad[0]} outside [0, {self.tok.num_codes})")
        image = transforms.infilling_image(row["image"], self.cfg.extra_image_size)
        tgt = [self.tok.code_0 + int(c) for c in codes]
        return self._example(
            "image_infilling",
            self.image_prompt,
            tgt,
            image,
            EXTRA_WEIGHT,
            code_mask=True,
            hole=transforms.infilling_hole(self.cfg.extra_image_size),
        )

    def detection(self, row: dict, rng: np.random.Generator) -> Example:
        objs = row["boxes"]
        boxes = [[o["x0"], o["y0"], o["x1"], o["y1"]] for o in objs]
        image, kept, keep = transforms.detection_image(row["image"], boxes, self.cfg.extra_image_size, rng)
        tgt = []
        for box, i in zip(kept, keep):
            tgt += self._bins(box) + self.tok.encode(" " + objs[i]["label"])
        return self._example("detection", self.detection_prompt, tgt, image, EXTRA_WEIGHT)


def _pick_other(pool, avoid: str, rng, what: str) -> str:
    """OFA's pick: uniform over all but the last entry; if it equals `avoid`, the last entry instead."""
    if len(pool) < 2:
        raise DataError(f"{what} needs at least 2 entries for ITM negatives, has {len(pool)}")
    pick = pool[int(rng.integers(len(pool) - 1))]
    return pool[len(pool) - 1] if pick == avoid else pick
