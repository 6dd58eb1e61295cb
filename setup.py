"""ofa-ds: OFA-style multimodal seq2seq pretraining on DeepSpeed (ZeRO data, Megatron tensor and pipeline parallelism).

Two small C extensions for the data side are built with the package when they compile: csrc/resample
(module _pixel_ops: Pillow's bicubic resize, bilinear affine transform and sharpness filter, and the HWC -> CHW
copy, vectorised; without it the loader uses Pillow and numpy, same pixels, slower) and
csrc/jpegtran (lossless progressive -> baseline JPEG at conversion; needs libjpeg's headers, e.g. Debian's
libjpeg-dev; without it tsv2arrow stores progressive JPEGs as they are).

torch is pinned to 2.13.0 so pip never replaces an installed build (or pulls a CUDA one on CPU
machines). The CUDA extension for the ResNet kernels (csrc/resnet) is built when CUDA is available;
OFA_DS_BUILD_CUDA=1 forces it, OFA_DS_BUILD_CUDA=0 skips it.
"""
import os

from setuptools import Extension, find_packages, setup


def cuda_extensions():
    flag = os.environ.get("OFA_DS_BUILD_CUDA")
    if flag == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if flag != "1" and not (torch.cuda.is_available() and CUDA_HOME):
        return [], {}
    from ofa_ds_build import resnet_extension  # noqa: E402  (csrc build description, see ofa_ds_build.py)

    return [resnet_extension(CUDAExtension)], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions() if os.path.exists("ofa_ds_build.py") else ([], {})
# -ffp-contract=off: the filter taps must be computed without FMA, as Pillow's are.
ext_modules.append(Extension("ofa_ds.data._pixel_ops", [f"csrc/resample/{f}.c" for f in ("module", "bicubic", "affine",
                             "sharpen", "planar")], optional=True,
                             extra_compile_args=["-O3", "-ffp-contract=off", "-std=c11"]))
ext_modules.append(Extension("ofa_ds.data._jpegtran", ["csrc/jpegtran/baseline.c"], libraries=["jpeg"],
                             optional=True, extra_compile_args=["-O2", "-std=c11"]))

setup(
    name="ofa-ds",
    version="0.1.0",
    description="OFA unified multimodal seq2seq pretraining with DeepSpeed: ZeRO, Megatron TP, pipeline stages",
    packages=find_packages(include=["ofa_ds", "ofa_ds.*", "data_tools", "benchmarks"]),
    package_data={"ofa_ds": ["assets/ofa_bpe/*", "assets/sample_images/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch==2.13.0",
        "deepspeed==0.19.8",
        "megatron-core==0.16.1",
        "triton==3.9.0",
        "numpy",
        "pyarrow",
        "sentencepiece",
        "tokenizers",
        "safetensors",
        "tensorboard",
        "tqdm",
        "pillow",
        "simplejpeg",
        "pyyaml",
        "matplotlib",
    ],
    extras_require={"test": ["pytest", "pytest-timeout"], "bench": ["scikit-image"]},
    entry_points={"console_scripts": ["ofa-ds=ofa_ds.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
