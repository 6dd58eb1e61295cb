"""train/host_memory: on CPU a training step's large blocks come back from the process's heap, not as fresh pages
from the kernel."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# A small MLP's training steps with 32 MB activations; prints the page faults of each step.
CHILD = """
import resource, sys, torch
from ofa_ds.train.host_memory import keep_freed_memory

kept = keep_freed_memory() if sys.argv[1] == "kept" else False
torch.manual_seed(0)
net = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
x = torch.randn(32768, 256)
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    net(x).square().mean().backward()
    net.zero_grad(set_to_none=True)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, *faults)
"""


def _faults(mode: str) -> tuple[str, list[int]]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    kept, *faults = out.stdout.split()
    return kept, [int(n) for n in faults]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_later_steps_reuse_the_heap_instead_of_faulting_pages_in():
    kept, faults = _faults("kept")
    _, default = _faults("default")
    assert kept == "True"
    # glibc alone unmaps each freed activation and faults every page of the next one in again (~99,000 a step)
    assert min(default[2:]) > 90_000
    assert sum(faults[2:]) < 0.25 * sum(default[2:])
