"""A synthetic OFA pretraining corpus in OFA's TSV layout (OFA_SPEC 5.1), deterministic by seed, no downloads.

    ofa-ds make-sample-corpus OUT [--vl-rows 64 --text-rows 32 --image-rows 16 --detection-rows 16]

Images are procedural scenes (JPEG; PNG for image infilling): coloured circles, squares and triangles on a
gradient background, with known boxes. No photographs ship with ofa_ds: none with a clear licence was found
among the installed packages. Captions ("a red circle above a blue square"), questions ("what color is the circle?"),
referring expressions ("the red circle"), detection labels and text are generated from the scenes, so
every task is learnable. Image-infilling rows are 256x256 with 256 codes that quantise the mean colour of
each 8x8 cell of the centre 128x128 region. Rows beyond --distinct-images reuse already encoded scenes,
which makes large benchmark corpora fast to write.
"""

from __future__ import annotations

import base64
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ofa_ds.data.schema import CODE_IMAGE_SIZE, LINE_POOLS, NEGATIVES_DIR, TSV_SOURCES, TYPE2ANS_FILE

COLORS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 215),
    "yellow": (235, 205, 40),
    "purple": (135, 55, 175),
    "orange": (240, 130, 30),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three", "four")
EXTRA_OBJECTS = ("ball", "box", "ring", "star", "cube", "disk")


@dataclass
class SampleConfig:
    out: str
    vl_rows: int = 64
    text_rows: int = 32
    image_rows: int = 16
    detection_rows: int = 16
    min_size: int = 256  # sides of VL and detection images are drawn from [min_size, max_size]
    max_size: int = 384
    distinct_images: int = 256  # per source; later rows reuse these encoded scenes
    seed: int = 0


@dataclass
class Obj:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    objs: list[Obj]
    image: str = ""  # URL-safe base64 JPEG, PNG for image-infilling rows ("" for text rows)
    codes: list[int] | None = None  # image-infilling rows


def write_sample_corpus(cfg: SampleConfig) -> Path:
    out = Path(cfg.out)
    (out / NEGATIVES_DIR).mkdir(parents=True, exist_ok=True)
    writers = {"vl": _vl_line, "text": _text_line, "image": _image_line, "detection": _detection_line}
    rows = {"vl": cfg.vl_rows, "text": cfg.text_rows, "image": cfg.image_rows, "detection": cfg.detection_rows}
    for source, line in writers.items():
        rng = random.Random(f"{cfg.seed}-{source}")
        scenes: list[Scene] = []
        with open(out / TSV_SOURCES[source][0], "w", encoding="utf-8") as f:
            for i in range(rows[source]):
                if len(scenes) < cfg.distinct_images:
                    scenes.append(_scene(rng, source, cfg))
                f.write("\t".join(line(i, scenes[i % len(scenes)], rng)) + "\n")
    _write_negatives(out / NEGATIVES_DIR, random.Random(f"{cfg.seed}-negatives"))
    return out


def _scene(rng: random.Random, source: str, cfg: SampleConfig) -> Scene:
    if source == "image":
        w = h = CODE_IMAGE_SIZE
    else:
        w, h = rng.randint(cfg.min_size, cfg.max_size), rng.randint(cfg.min_size, cfg.max_size)
    scene = Scene(_place(rng, w, h, rng.randint(1, 4 if source == "detection" else 3)))
    if source != "text":
        image = _draw(rng, w, h, scene.objs)
        buf = io.BytesIO()
        image.save(buf, format="PNG" if source == "image" else "JPEG")  # PNG: codes match the decoded pixels
        scene.image = base64.urlsafe_b64encode(buf.getvalue()).decode()
        scene.codes = _codes(image) if source == "image" else None
    return scene


def _place(rng: random.Random, w: int, h: int, n: int) -> list[Obj]:
    """Up to n non-overlapping objects, each (shape, colour) at most once."""
    objs: list[Obj] = []
    for _ in range(50 * n):
        if len(objs) == n:
            break
        side = rng.randint(min(w, h) // 6, min(w, h) // 3)
        x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
        box = (x0, y0, x0 + side, y0 + side)
        o = Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), box)
        if all(o.name != p.name and not _overlap(box, p.box) for p in objs):
            objs.append(o)
    return objs


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _draw(rng: random.Random, w: int, h: int, objs: list[Obj]) -> Image.Image:
    top, bottom = (rng.randint(90, 200) for _ in range(2))
    mask = Image.linear_gradient("L").resize((w, h))
    image = Image.composite(Image.new("RGB", (w, h), (bottom,) * 3), Image.new("RGB", (w, h), (top,) * 3), mask)
    draw = ImageDraw.Draw(image)
    for o in objs:
        x0, y0, x1, y1 = o.box
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)
    return image


def _codes(image: Image.Image) -> list[int]:
    """256 codes of the centre 128x128: mean colour of each 8x8 cell as 5+4+4 bits (< 8192), row-major."""
    rgb = image.crop((64, 64, 192, 192)).resize((16, 16), Image.Resampling.BOX).tobytes()
    return [(r >> 3) << 8 | (g >> 4) << 4 | (b >> 4) for r, g, b in zip(rgb[0::3], rgb[1::3], rgb[2::3])]


def _relation(a: Obj, b: Obj) -> str:
    dx = (a.box[0] + a.box[2] - b.box[0] - b.box[2]) / 2
    dy = (a.box[1] + a.box[3] - b.box[1] - b.box[3]) / 2
    if abs(dx) > abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _caption(objs: list[Obj]) -> str:
    if len(objs) == 1:
        return f"a {objs[0].name}"
    text = f"a {objs[0].name} {_relation(objs[0], objs[1])} a {objs[1].name}"
    return text + "".join(f" and a {o.name}" for o in objs[2:])


def _vl_line(i: int, scene: Scene, rng: random.Random) -> list[str]:
    objs = scene.objs
    task = ("caption", "qa", "visual_grounding")[i % 3]
    caption, question, refs, dataset = _caption(objs), "", "", "sample"
    named = objs
    if task == "caption" and i % 8 == 0:
        dataset = "cc12m"  # OFA pads the first two target tokens of cc12m captions
    if task == "qa":
        question, refs, named = _qa(objs, rng)
    if task == "visual_grounding":
        target = rng.choice(objs)
        caption, named = f"the {target.name}", [target]
        refs = ",".join(f"{v:.1f}" for v in target.box)
    gt_objects = "&&".join(dict.fromkeys(o.shape for o in named))
    return [f"vl-{i}", scene.image, caption, question, refs, gt_objects, dataset, task]


def _qa(objs: list[Obj], rng: random.Random) -> tuple[str, str, list[Obj]]:
    """(question, `conf|!+answer&&...` in TSV order, objects the question names)."""
    kind = rng.randrange(3)
    unique = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
    if kind == 0 and unique:
        o = rng.choice(unique)
        others = [c for c in COLORS if c != o.color]
        return f"what color is the {o.shape}?", f"1.0|!+{o.color}&&0.3|!+{rng.choice(others)}", [o]
    if kind <= 1:
        return "how many shapes are there?", f"1.0|!+{len(objs)}", []
    shape = rng.choice(SHAPES)
    answer = "yes" if any(o.shape == shape for o in objs) else "no"
    return f"is there a {shape}?", f"1.0|!+{answer}", [o for o in objs if o.shape == shape][:1]


def _text_line(i: int, scene: Scene, rng: random.Random) -> list[str]:
    objs = scene.objs
    sentences = [
        f"there {'is' if len(objs) == 1 else 'are'} {COUNTS[len(objs) - 1]} "
        f"shape{'s' if len(objs) > 1 else ''} in the picture."
    ]
    sentences += [f"the {a.name} is {_relation(a, b)} the {b.name}." for a, b in zip(objs, objs[1:])]
    sentences += [f"the {o.shape} is {o.color}." for o in objs]
    rng.shuffle(sentences)
    return [f"text-{i}", " ".join(sentences)]


def _image_line(i: int, scene: Scene, rng: random.Random) -> list[str]:
    return [f"image-{i}", scene.image, " ".join(map(str, scene.codes))]


def _detection_line(i: int, scene: Scene, rng: random.Random) -> list[str]:
    by_size = sorted(scene.objs, key=lambda o: -(o.box[2] - o.box[0]) * (o.box[3] - o.box[1]))  # OFA: pre-sorted
    boxes = "&&".join(",".join([*(f"{v:.1f}" for v in o.box), str(SHAPES.index(o.shape)), o.shape]) for o in by_size)
    return [f"det-{i}", scene.image, boxes]


def _write_negatives(neg: Path, rng: random.Random) -> None:
    captions = [_caption(_place(rng, 256, 256, rng.randint(1, 3))) for _ in range(200)]
    (neg / LINE_POOLS["captions"][0]).write_text("\n".join(captions) + "\n")
    (neg / LINE_POOLS["objects"][0]).write_text("\n".join((*SHAPES, *EXTRA_OBJECTS)) + "\n")
    type2ans = {
        "color": list(COLORS),
        "how many": [str(k) for k in range(1, 5)],
        "yes/no": ["yes", "no"],
        "other": [*SHAPES, *EXTRA_OBJECTS],
    }
    (neg / TYPE2ANS_FILE).write_text(json.dumps(type2ans, indent=1) + "\n")


def add_arguments(p) -> None:
    d = SampleConfig("")
    p.add_argument("out", help="output directory (OFA's layout: *_examples.tsv, negative_sample/)")
    helps = {
        "vl_rows": "vision-language rows (caption, VQA, grounding)",
        "text_rows": "text-infilling rows",
        "image_rows": "image-infilling rows (256 px, with VQGAN-style codes)",
        "detection_rows": "detection rows",
        "min_size": "smallest side of VL and detection images, pixels (>= 24)",
        "max_size": "largest side of VL and detection images, pixels",
        "distinct_images": "distinct images per source; later rows reuse them",
        "seed": "random seed",
    }
    for name, text in helps.items():
        p.add_argument(
            "--" + name.replace("_", "-"), type=int, default=getattr(d, name), help=f"{text} (default: %(default)s)"
        )


def run(args) -> int:
    cfg = SampleConfig(
        args.out,
        args.vl_rows,
        args.text_rows,
        args.image_rows,
        args.detection_rows,
        args.min_size,
        args.max_size,
        args.distinct_images,
        args.seed,
    )
    if not 24 <= cfg.min_size <= cfg.max_size or cfg.distinct_images < 1:
        raise SystemExit("make-sample-corpus: need 24 <= --min-size <= --max-size and --distinct-images >= 1")
    print(f"wrote {write_sample_corpus(cfg)}")
    return 0
