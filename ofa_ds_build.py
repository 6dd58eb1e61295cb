"""How csrc/resnet is compiled. One description for setup.py (the prebuilt extension), the JIT loader
(ofa_ds/kernels/resnet/cuda_ext.py) and the compile tests (tests/test_cuda_compile.py,
tests/test_resnet_kernels.py).

The .cu kernels use only the CUDA runtime headers, so nvcc alone compiles them (CI does, for sm_80 and
sm_90, warnings as errors); the torch binding is a .cpp that needs torch's CUDA headers.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent
CSRC = "csrc/resnet"
EXTENSION = "ofa_ds.kernels.resnet._C"  # a torch op library (torch.ops.ofa_resnet), not a Python module
BINDING = f"{CSRC}/bn_act_binding.cpp"
KERNELS = (f"{CSRC}/bn_act_backward.cu", f"{CSRC}/bn_act_forward.cu")
HOST_MATH = f"{CSRC}/bn_act_host.cpp"  # CPU build of the kernels' shared math, for tests (ctypes)

CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3"]
STRICT_NVCC_FLAGS = ["-std=c++20", "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]


def resnet_extension(CUDAExtension):
    """The extension for setup.py (relative source paths; torch picks the archs, see TORCH_CUDA_ARCH_LIST)."""
    return CUDAExtension(EXTENSION, sources=[BINDING, *KERNELS],
                         extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS})


def nvcc_compile_command(nvcc: str, source: str, arch: str, output: str) -> list[str]:
    """Compile-only check of one kernel file for sm_<arch> with warnings as errors."""
    return [nvcc, "-c", str(ROOT / source), "-o", output, *NVCC_FLAGS, *STRICT_NVCC_FLAGS,
            "-gencode", f"arch=compute_{arch},code=sm_{arch}"]


def host_math_command(cxx: str, output: str) -> list[str]:
    return [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", str(ROOT / HOST_MATH),
            "-o", output]
