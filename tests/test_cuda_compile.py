"""csrc/resnet compiles (compile only; nothing CUDA runs here): every .cu with nvcc for sm_80 and sm_90
with warnings as errors, and the torch binding against this torch's headers."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import include_paths

from ofa_ds.kernels.resnet import build

NVCC = shutil.which("nvcc")
CU_FILES = sorted(p.relative_to(build.ROOT).as_posix() for p in (build.ROOT / build.CSRC).glob("*.cu"))
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")


def _run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


def test_the_build_compiles_every_kernel_file():
    assert CU_FILES and CU_FILES == sorted(build.KERNELS)


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("arch", ["80", "90"])
def test_kernels_compile_without_warnings(arch, tmp_path):
    for source in CU_FILES:
        obj = tmp_path / f"{Path(source).stem}.o"
        r = _run(build.nvcc_compile_command(NVCC, source, arch, str(obj)))
        assert r.returncode == 0, f"nvcc {source} for sm_{arch}:\n{r.stdout}{r.stderr}"
        assert obj.stat().st_size > 0


@needs_nvcc
@pytest.mark.parametrize("warning", ["host", "device"])
def test_strict_flags_turn_warnings_into_errors(warning, tmp_path):
    """The flags of the test above do reject a warning in host code and in device code."""
    body = {
        "host": "int f() { int unused = 0; return 1; }",
        "device": "__global__ void k(float* p) { int unused = 0; p[0] = 1.f; }",
    }[warning]
    (tmp_path / "w.cu").write_text(body + "\n")
    r = _run(
        [
            NVCC,
            "-c",
            str(tmp_path / "w.cu"),
            "-o",
            str(tmp_path / "w.o"),
            *build.STRICT_NVCC_FLAGS,
            "-gencode",
            "arch=compute_80,code=sm_80",
        ]
    )
    assert r.returncode != 0 and "unused" in r.stdout + r.stderr


def _cuda_include() -> Path | None:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if NVCC is not None:
        homes.append(str(Path(NVCC).resolve().parents[1]))
    for home in filter(None, homes):
        if (Path(home) / "include" / "cuda_runtime_api.h").exists():
            return Path(home) / "include"
    return None


@pytest.mark.slow
def test_torch_binding_compiles(tmp_path):
    """Syntax and types of bn_act_binding.cpp against torch's headers and the kernels' launcher API."""
    cxx, cuda_include = shutil.which("g++") or shutil.which("c++"), _cuda_include()
    if cxx is None or cuda_include is None:
        pytest.skip("needs a C++ compiler and the CUDA runtime headers")
    torch_include = Path(include_paths()[0])
    includes = [cuda_include, *map(Path, include_paths())]
    generated = "c10/cuda/impl/cuda_cmake_macros.h"
    if not (torch_include / generated).exists():  # CPU wheels ship c10/cuda without this generated header
        (tmp_path / generated).parent.mkdir(parents=True)
        (tmp_path / generated).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.insert(0, tmp_path)
    cmd = [cxx, "-fsyntax-only", "-std=c++20", "-Wall", "-Wextra", "-Werror", str(build.ROOT / build.BINDING)]
    for inc in includes:
        cmd += ["-isystem", str(inc)]
    r = _run(cmd)
    assert r.returncode == 0, f"{build.BINDING} (torch {torch.__version__}):\n{r.stderr}"
