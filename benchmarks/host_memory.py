"""What keeping freed memory (ofa_ds/train/host_memory.py) costs and saves on CPU: per training step of a model,
its time, page faults and resident memory, with glibc's default malloc and with freed blocks kept. JSON on stdout.

    OMP_NUM_THREADS=1 python benchmarks/host_memory.py --preset ofa_base --steps 30

Steps vary as real streams do: each draws 1 or 2 images (2 examples each, sharing it) and a source length in
[30, 60] from a seeded generator, the same sequence for both settings. Each setting runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import emit  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(a) -> dict:
    from ofa_ds.train.host_memory import keep_freed_memory

    kept = a.one == "kept" and keep_freed_memory()
    import torch

    from ofa_ds.config import model_preset
    from ofa_ds.model.ofa import OFAModel

    torch.manual_seed(0)
    model = OFAModel(model_preset(a.preset, attn_backend="sdpa")).train()
    g = torch.Generator().manual_seed(0)
    pick = random.Random(0)
    grid = (a.image_size // 16) ** 2
    steps = []
    for _ in range(a.steps):
        images = pick.choice((1, 2))
        B = 2 * images
        stream = {
            "src_tokens": torch.randint(4, 50000, (B, pick.randint(30, 60)), generator=g),
            "prev_output_tokens": torch.randint(4, 50000, (B, 24), generator=g),
            "patch_images": torch.randn(images, 3, a.image_size, a.image_size, generator=g),
            "patch_masks": torch.ones(B, dtype=torch.bool),
            "image_index": torch.arange(B) // 2,
            "patch_idx": torch.stack([torch.randperm(grid, generator=g)[:196] for _ in range(B)]),
        }
        target = torch.randint(4, 50000, (B, 24), generator=g)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        logits = model(stream)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
        model.zero_grad(set_to_none=True)
        steps.append(
            {
                "images": images,
                "step_s": round(time.perf_counter() - t, 3),
                "page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
                "rss_mb": round(rss_mb()),
            }
        )
    return {"setting": a.one, "kept": kept, "threads": torch.get_num_threads(), "steps": steps}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--preset", default="ofa_base", help="model preset")
    p.add_argument("--image-size", type=int, default=384, help="image side in pixels")
    p.add_argument("--steps", type=int, default=30, help="training steps per setting")
    p.add_argument("--out", help="also write the results to this JSON file")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one setting in this process
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a)))
        return
    runs = []
    for setting in ("default", "kept"):
        argv = [sys.executable, __file__, *sys.argv[1:], "--one", setting]
        runs.append(json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout))
    later = {r["setting"]: r["steps"][len(r["steps"]) // 3 :] for r in runs}  # after the first third (warm-up)
    summary = {
        s: {
            "page_faults_per_step": sum(x["page_faults"] for x in st) / len(st),
            "step_s_total": round(sum(x["step_s"] for x in st), 2),
            "rss_mb_min_max": [min(x["rss_mb"] for x in st), max(x["rss_mb"] for x in st)],
        }
        for s, st in later.items()
    }
    doc = {"preset": a.preset, "image_size": a.image_size, "summary_after_first_third": summary, "runs": runs}
    emit(doc, a.out)


if __name__ == "__main__":
    main()
