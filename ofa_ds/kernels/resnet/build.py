"""How csrc/resnet is compiled. One description for setup.py (the prebuilt extension), the JIT loader (cuda_ext.py)
and the compile tests (tests/test_cuda_compile.py, tests/test_resnet_kernels.py).

The sources are found where they are: a wheel (or `pip install .`) ships a copy of csrc/resnet as the package data
ofa_ds/kernels/resnet/csrc/ (setup.py maps it there); a source checkout (an editable install, setup.py itself) has
them at csrc/resnet/, which stays the one copy in the repository. Every path below is relative to ROOT.

The .cu kernels use only the CUDA runtime headers, so nvcc alone compiles them (CI does, for sm_80 and sm_90,
warnings as errors); the torch binding is a .cpp that needs torch's CUDA headers.

Nothing is imported from ofa_ds or torch: setup.py loads this file on its own.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
if (_PACKAGE / "csrc").is_dir():  # installed from a wheel
    ROOT, CSRC = _PACKAGE, "csrc"
else:  # a source checkout: ofa_ds/kernels/resnet -> the repository root
    ROOT, CSRC = _PACKAGE.parents[2], "csrc/resnet"
EXTENSION = "ofa_ds.kernels.resnet._C"  # a torch op library (torch.ops.ofa_resnet), not a Python module
BINDING = f"{CSRC}/bn_act_binding.cpp"
KERNELS = (f"{CSRC}/bn_act_backward.cu", f"{CSRC}/bn_act_forward.cu")
HOST_MATH = f"{CSRC}/bn_act_host.cpp"  # CPU build of the kernels' shared math, for tests (ctypes)

CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3"]
STRICT_NVCC_FLAGS = ["-std=c++20", "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]


def sources_present() -> bool:
    return all((ROOT / s).is_file() for s in (BINDING, *KERNELS))


def resnet_extension(CUDAExtension):
    """The extension for setup.py (source paths relative to the checkout; torch picks the archs, see
    TORCH_CUDA_ARCH_LIST)."""
    return CUDAExtension(
        EXTENSION, sources=[BINDING, *KERNELS], extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS}
    )


def nvcc_compile_command(nvcc: str, source: str, arch: str, output: str) -> list[str]:
    """Compile-only check of one kernel file for sm_<arch> with warnings as errors."""
    return [
        nvcc,
        "-c",
        str(ROOT / source),
        "-o",
        output,
        *NVCC_FLAGS,
        *STRICT_NVCC_FLAGS,
        "-gencode",
        f"arch=compute_{arch},code=sm_{arch}",
    ]


def host_math_command(cxx: str, output: str) -> list[str]:
    return [
        cxx,
        "-O2",
        "-std=c++17",
        "-shared",
        "-fPIC",
        "-Wall",
        "-Wextra",
        "-Werror",
        str(ROOT / HOST_MATH),
        "-o",
        output,
    ]
