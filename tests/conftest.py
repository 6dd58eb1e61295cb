import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter without a GPU (must be set before triton is imported);
    # DeepSpeed runs on its CPU accelerator.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).resolve().parent / "assets"
sys.path.insert(0, str(ROOT))
