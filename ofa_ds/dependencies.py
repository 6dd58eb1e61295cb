"""What ofa-ds declares it needs: the one list that setup.py's install_requires and `ofa-ds env`'s range check read,
and the small steps launch/install.sh and launch/wheelhouse.sh run with it.

Ranges, not pins, so that pip leaves a cluster's own torch (a vendor or NGC build) alone when it lies inside them.
The exact versions CI tests are in constraints.txt (`pip install -c constraints.txt`). triton is not declared: it is
whatever the installed torch brings (only the test extra asks for one, for the Triton interpreter on CPU).

At module level this file imports nothing outside the standard library: setup.py reads it before ofa_ds or any
dependency is installed, and the launch scripts run it as a script:

    python ofa_ds/dependencies.py requirements           # install_requires and the test extra, one a line
    python ofa_ds/dependencies.py constraints FILE [--as-installed]   # see constraints()
    python ofa_ds/dependencies.py check-torch            # exit 0: torch in range, 3: none, 4: outside (one line)
    python ofa_ds/dependencies.py wheels REPORT          # name==version of a `pip --report`, torch's stack left out
    python ofa_ds/dependencies.py sources REPORT         # those of them built from source, comma-separated
"""

from __future__ import annotations

import json
import sys

# torch: megatron-core 0.16 requires 2.6 (the code itself needs 2.5: torch.serialization.safe_globals and
# get_unsafe_globals_in_checkpoint); the torch names ofa_ds uses were checked against 2.6's sources, but CI runs only
# the pinned 2.13. The ceiling is the newest minor CI tests (constraints.txt).
# deepspeed, megatron-core: the code reaches into DeepSpeed's internals (ZeRO fragment addresses, its checkpoint
# engine, the pipeline topology) and megatron-core's parallel_state and tensor_parallel: the tested release and its
# later patch releases only.
INSTALL_REQUIRES = [
    "torch>=2.6,<2.14",
    "deepspeed>=0.19.8,<0.20",
    "megatron-core>=0.16.1,<0.17",
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
    "packaging",  # this range check
]
EXTRAS_REQUIRE = {
    # A CUDA torch brings its own triton, which satisfies this; a CPU torch brings none.
    "test": ["pytest", "pytest-timeout", "ruff", "triton; platform_system == 'Linux'"],
    "bench": ["scikit-image"],
}
KEPT_AS_INSTALLED = ("torch", "triton")  # the launch scripts never replace them once installed


def _packaging():
    """packaging's classes; pip's vendored copy where packaging itself is not installed (a bare venv)."""
    try:
        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name
        from packaging.version import InvalidVersion, Version
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.utils import canonicalize_name
        from pip._vendor.packaging.version import InvalidVersion, Version
    return Requirement, canonicalize_name, Version, InvalidVersion


def installed_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def outside_range(requirement: str, version: str | None) -> str | None:
    """Why `version` does not meet `requirement` (one line), or None when it does or does not apply here.

    Pre-releases count as inside, as pip counts installed ones: vendor builds carry versions such as 2.7.0a0+git...
    """
    Requirement, _, Version, InvalidVersion = _packaging()
    req = Requirement(requirement)
    if req.marker is not None and not req.marker.evaluate():
        return None
    wanted = requirement.split(";")[0][len(req.name) :].strip()  # as written: >=2.6,<2.14
    if version is None:
        return f"{req.name} is not installed (ofa-ds needs {req.name}{wanted})"
    if not wanted:
        return None
    try:
        inside = req.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return f"{req.name} {version} is not a PEP 440 version: cannot check it against {wanted}"
    if inside:
        return None
    return f"{req.name} {version} is outside the tested range {wanted}"


def outside_ranges(versions: dict[str, str | None], requirements=None) -> list[str]:
    """One line per declared dependency outside its range. versions: name -> installed version (None: absent)."""
    Requirement, canonicalize_name, _, _ = _packaging()
    by_name = {canonicalize_name(k): v for k, v in versions.items()}
    lines = []
    for text in INSTALL_REQUIRES if requirements is None else requirements:
        line = outside_range(text, by_name.get(canonicalize_name(Requirement(text).name)))
        if line is not None:
            lines.append(line)
    return lines


def check_installed() -> list[str]:
    """outside_ranges of what this Python has installed."""
    Requirement = _packaging()[0]
    names = [Requirement(text).name for text in INSTALL_REQUIRES]
    return outside_ranges({name: installed_version(name) for name in names})


def constraints(text: str, as_installed: bool) -> list[str]:
    """A constraints file's lines for pip. as_installed: torch and triton pinned to the installed versions where
    installed (so that pip never replaces them), else the file's pins. Without it: the file's pins less triton's,
    which fits only the torch it was tested beside (a CUDA torch requires its own triton)."""
    Requirement, canonicalize_name, _, _ = _packaging()
    out = []
    for line in text.splitlines():
        spec = line.split("#", 1)[0].strip()
        if not spec:
            continue
        name = canonicalize_name(Requirement(spec).name)
        version = installed_version(name) if as_installed and name in KEPT_AS_INSTALLED else None
        if version is not None:
            out.append(f"{name}=={version}")
        elif as_installed or name != "triton":
            out.append(spec)
    return out


def is_torch_stack(name: str) -> bool:
    """torch and what a CUDA torch brings with it (triton, the nvidia-* and cuda-* wheels): GBs a cluster has."""
    _, canonicalize_name, _, _ = _packaging()
    name = canonicalize_name(name)
    return name in ("torch", "triton", "pytorch-triton") or name.startswith(("nvidia-", "cuda-"))


def report_wheels(report: dict, with_torch: bool = False) -> list[str]:
    """name==version of each distribution a `pip install --dry-run --report` would install."""
    out = []
    for item in report["install"]:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        if with_torch or not is_torch_stack(name):
            out.append(f"{name}=={version}")
    return out


def report_sources(report: dict) -> list[str]:
    """Names of the distributions a `pip --report` would build from source (no wheel on the index: deepspeed)."""
    return [
        item["metadata"]["name"]
        for item in report["install"]
        if not item["download_info"]["url"].split("#")[0].endswith(".whl")
    ]


def main(argv: list[str]) -> int:
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    if command == "requirements":
        print("\n".join([*INSTALL_REQUIRES, *EXTRAS_REQUIRE["test"]]))
        return 0
    if command == "constraints" and args:
        with open(args[0], encoding="utf-8") as f:
            print("\n".join(constraints(f.read(), as_installed="--as-installed" in args)))
        return 0
    if command == "check-torch":
        torch_req = next(r for r in INSTALL_REQUIRES if r.startswith("torch"))
        version = installed_version("torch")
        if version is None:
            return 3
        why = outside_range(torch_req, version)
        if why is not None:
            print(why)
            return 4
        return 0
    if command == "wheels" and args:
        with open(args[0], encoding="utf-8") as f:
            for line in report_wheels(json.load(f), with_torch="--with-torch" in args):
                print(line)
        return 0
    if command == "sources" and args:
        with open(args[0], encoding="utf-8") as f:
            print(",".join(report_sources(json.load(f))))
        return 0
    print(__doc__.split("\n\n")[-1].rstrip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
