"""ofa-ds: OFA-style multimodal seq2seq pretraining on DeepSpeed (ZeRO data, Megatron tensor and pipeline parallelism).

Dependencies are declared as tested ranges in ofa_ds/dependencies.py (read below), so that pip keeps a cluster's own
torch when it is inside them; the exact versions CI tests are in constraints.txt (`pip install -c constraints.txt`,
as launch/install.sh does). triton is not declared: it is whatever the installed torch brings.

Two small C extensions for the data side are built with the package when they compile: csrc/resample
(module _pixel_ops: Pillow's bicubic resize, bilinear affine transform and sharpness filter, and the HWC -> CHW
copy, vectorised; without it the loader uses Pillow and numpy, same pixels, slower) and
csrc/jpegtran (lossless progressive -> baseline JPEG at conversion; needs libjpeg's headers, e.g. Debian's
libjpeg-dev; without it tsv2arrow stores progressive JPEGs as they are). OFA_DS_BUILD_C=0 skips both (a pure-Python
wheel, as launch/wheelhouse.sh builds for another Python or platform).

The CUDA extension for the ResNet kernels (csrc/resnet) is built when CUDA is available; OFA_DS_BUILD_CUDA=1 forces
it, OFA_DS_BUILD_CUDA=0 skips it. Its sources also ship in the package (ofa_ds/kernels/resnet/csrc/, mapped from
csrc/resnet, the one copy in the repository), so an installed ofa-ds can compile it on first use on a CUDA machine.
"""

import os
import runpy

from setuptools import Extension, find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
# Loaded as files, not imported: importing ofa_ds here would need its dependencies before they are installed.
DEPS = runpy.run_path(os.path.join(HERE, "ofa_ds", "dependencies.py"))
BUILD = runpy.run_path(os.path.join(HERE, "ofa_ds", "kernels", "resnet", "build.py"))


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
    return [BUILD["resnet_extension"](CUDAExtension)], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
if os.environ.get("OFA_DS_BUILD_C") != "0":
    # -ffp-contract=off: the filter taps must be computed without FMA, as Pillow's are.
    ext_modules.append(
        Extension(
            "ofa_ds.data._pixel_ops",
            [f"csrc/resample/{f}.c" for f in ("module", "bicubic", "affine", "sharpen", "planar")],
            optional=True,
            extra_compile_args=["-O3", "-ffp-contract=off", "-std=c11"],
        )
    )
    ext_modules.append(
        Extension(
            "ofa_ds.data._jpegtran",
            ["csrc/jpegtran/baseline.c"],
            libraries=["jpeg"],
            optional=True,
            extra_compile_args=["-O2", "-std=c11"],
        )
    )

setup(
    name="ofa-ds",
    version="0.1.0",
    description="OFA unified multimodal seq2seq pretraining with DeepSpeed: ZeRO, Megatron TP, pipeline stages",
    # ofa_ds only: data_tools/ and benchmarks/ are scripts in the checkout, not installed packages.
    packages=[*find_packages(include=["ofa_ds", "ofa_ds.*"]), "ofa_ds.kernels.resnet.csrc"],
    package_dir={"ofa_ds.kernels.resnet.csrc": "csrc/resnet"},
    package_data={
        "ofa_ds": ["assets/ofa_bpe/*", "assets/sample_images/*"],
        "ofa_ds.kernels.resnet.csrc": ["*.cu", "*.cuh", "*.cpp", "*.h"],
    },
    python_requires=">=3.10",
    install_requires=DEPS["INSTALL_REQUIRES"],
    extras_require=DEPS["EXTRAS_REQUIRE"],
    entry_points={"console_scripts": ["ofa-ds=ofa_ds.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
