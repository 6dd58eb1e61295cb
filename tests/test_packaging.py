"""Packaging: the declared dependency ranges (ofa_ds/dependencies.py) against CI's pins (constraints.txt),
`ofa-ds env`'s range and apex checks, launch/install.sh's refusal of a torch outside the range, and (slow) ofa-ds
built as a wheel, collected into a wheelhouse and installed from it with no package index into a fresh venv outside
the checkout."""

import os
import subprocess
import sys
import types
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ofa_ds import dependencies as D

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    """constraints.txt as name -> version."""
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        spec = line.split("#", 1)[0].strip()
        if spec:
            req = Requirement(spec)
            ((op, version),) = [(s.operator, s.version) for s in req.specifier]
            assert op == "==", spec
            out[canonicalize_name(req.name)] = version
    return out


def test_declared_ranges_parse_and_include_the_pins():
    declared = [Requirement(r) for r in [*D.INSTALL_REQUIRES, *D.EXTRAS_REQUIRE["test"]]]
    pinned = pins()
    for req in declared:
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is declared but constraints.txt has no pin for it"
        assert D.outside_range(str(req), pinned[name]) is None, (str(req), pinned[name])
    assert {canonicalize_name(r.name) for r in declared} == set(pinned), "constraints.txt pins what is not declared"
    ranged = {canonicalize_name(Requirement(r).name): Requirement(r).specifier for r in D.INSTALL_REQUIRES}
    assert all(ranged[name] for name in ("torch", "deepspeed", "megatron-core")), "ranges, not open-ended"
    assert not any(s.operator == "==" for s in ranged["torch"]), "torch is a range, not a pin"
    assert "triton" not in ranged, "triton is what the installed torch brings"
    assert pinned["torch"] == "2.13.0" and D.outside_range(D.INSTALL_REQUIRES[0], "2.13.0+cpu") is None


def test_env_flags_versions_outside_the_ranges(monkeypatch, capsys):
    flags = D.outside_ranges(
        {"torch": "2.4.1", "deepspeed": "0.20.0", "megatron-core": None, "numpy": "1.0"},
        ["torch>=2.6,<2.14", "deepspeed>=0.19.8,<0.20", "megatron-core>=0.16.1", "numpy"],
    )
    assert flags == [
        "torch 2.4.1 is outside the tested range >=2.6,<2.14",
        "deepspeed 0.20.0 is outside the tested range >=0.19.8,<0.20",
        "megatron-core is not installed (ofa-ds needs megatron-core>=0.16.1)",
    ]
    # vendor builds are pre-releases with a local part (NGC: 2.7.0a0+79aa17489c.nv25.4); pip counts them as inside
    assert D.outside_range("torch>=2.6,<2.14", "2.7.0a0+79aa17489c.nv25.4") is None
    assert D.outside_range("torch>=2.6,<2.14", "2.14.0a0+git1234") is not None
    assert "not a PEP 440 version" in D.outside_range("torch>=2.6", "unknown")

    # `ofa-ds env` as printed: one line per dependency outside its range
    from ofa_ds.train import env

    fake = {"torch": "2.4.1", "deepspeed": "0.19.8", "megatron-core": "0.16.1"}
    real = D.installed_version
    monkeypatch.setattr(D, "installed_version", lambda name: fake.get(name) or real(name))
    monkeypatch.setattr(env, "extensions", lambda: {})  # no DeepSpeed op builders: not what is tested here
    assert env.run(types.SimpleNamespace(json=False)) == 0
    out = capsys.readouterr().out
    flagged = [line for line in out.splitlines() if "WARNING" in line]
    assert flagged == ["  WARNING: torch 2.4.1 is outside the tested range >=2.6,<2.14"], out
    assert "  apex  " in out


def test_constraints_keep_an_installed_torch_and_wheel_lists_leave_it_out(monkeypatch):
    monkeypatch.setattr(D, "installed_version", {"torch": "2.7.0a0+nv", "triton": "3.3.0"}.get)
    text = (ROOT / "constraints.txt").read_text()
    kept = D.constraints(text, as_installed=True)
    assert "torch==2.7.0a0+nv" in kept and "triton==3.3.0" in kept and "deepspeed==0.19.8" in kept
    fresh = D.constraints(text, as_installed=False)  # the pinned torch, and the triton it requires
    assert "torch==2.13.0" in fresh and not any(line.startswith("triton") for line in fresh)
    report = {
        "install": [
            {"metadata": {"name": n, "version": "1"}, "download_info": {"url": f"https://x/{n}-1{ext}"}}
            for n, ext in (
                ("torch", ".whl"),
                ("triton", ".whl"),
                ("nvidia-cudnn-cu13", ".whl"),
                ("cuda-bindings", ".whl"),
                ("numpy", ".whl"),
                ("deepspeed", ".tar.gz"),
            )
        ]
    }
    assert D.report_wheels(report) == ["numpy==1", "deepspeed==1"]
    assert len(D.report_wheels(report, with_torch=True)) == 6
    assert D.report_sources(report) == ["deepspeed"]  # no wheel on the index: wheelhouse.sh builds one


def test_apex_is_nvidias_or_named_so(tmp_path, monkeypatch):
    from ofa_ds.train.env import apex_status

    for name in list(sys.modules):
        if name == "apex" or name.startswith("apex."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "apex").mkdir()
    (tmp_path / "apex" / "__init__.py").write_text("")  # PyPI's apex: another project
    assert "not NVIDIA's" in apex_status()
    monkeypatch.delitem(sys.modules, "apex")
    (tmp_path / "apex" / "normalization").mkdir()
    (tmp_path / "apex" / "normalization" / "__init__.py").write_text("")
    assert apex_status() == "NVIDIA apex, Python only (built without its CUDA extensions)"


def test_install_refuses_a_torch_outside_the_range(tmp_path):
    """One line naming the version and the range, and nothing installed (pip is never run). The venv sees this
    Python's packages (packaging among them) but its own torch first."""
    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=False)
    python = tmp_path / "venv" / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
        ).strip()
    )
    info = site / "torch-2.4.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.4.1\n")
    done = subprocess.run(
        ["bash", str(ROOT / "launch" / "install.sh")],
        env={**os.environ, "PYTHON": str(python)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "install.sh: torch 2.4.1 is outside the tested range >=2.6,<2.14: install a torch inside it first, or "
        "uninstall this one for the tested torch"
    ]
    assert sorted(p.name for p in site.iterdir()) == ["torch-2.4.1.dist-info"]


def _offline_env() -> dict:
    """No package index, no pip configuration (this machine's points at local wheel folders), and any network
    access fails at once through a proxy that is not there. PYTHONPATH dropped: nothing from the checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    proxy = "http://127.0.0.1:9"
    return {
        **env,
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_NO_INDEX": "1",
        "http_proxy": proxy,
        "https_proxy": proxy,
        "HTTP_PROXY": proxy,
        "HTTPS_PROXY": proxy,
        "DS_ACCELERATOR": "cpu",
    }


@pytest.mark.slow
def test_wheel_installs_from_a_wheelhouse_offline(tmp_path):
    """launch/wheelhouse.sh builds ofa-ds's wheel, launch/install.sh --wheelhouse installs it into a fresh venv outside
    the checkout with no package index, and `ofa-ds env` and the quickstart's data steps run from another directory.

    Kept to about a minute for CI: the venv is made with --system-site-packages (and --without-pip: it uses this
    Python's pip and setuptools) so that torch, deepspeed and the other dependencies come from this Python's site
    packages, and the wheelhouse is built with --skip-installed, so it holds what this Python lacks: ofa-ds's own wheel.
    The full path was checked by hand, not here: collecting every dependency (the default: 60 wheels, 146 MB without
    torch) took 81 s on this 2-core machine, with --with-torch 114 s (602 MB), and installing that into a bare venv
    with the network cut off 76 s. Building ofa-ds's wheel needs the package index (setuptools for pip's isolated
    build), as launch/install.sh always has.
    """
    assert not tmp_path.is_relative_to(ROOT)
    wheelhouse = tmp_path / "wheelhouse"
    done = subprocess.run(
        ["bash", str(ROOT / "launch" / "wheelhouse.sh"), str(wheelhouse), "--skip-installed"],
        env={**os.environ, "PYTHON": sys.executable},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    wheels = sorted(wheelhouse.glob("*.whl"))
    assert [w.name.split("-")[0] for w in wheels] == ["ofa_ds"], wheels
    with zipfile.ZipFile(wheels[0]) as z:
        names = z.namelist()
        metadata = z.read("ofa_ds-0.1.0.dist-info/METADATA").decode()
    assert {n.split("/")[0] for n in names} == {"ofa_ds", "ofa_ds-0.1.0.dist-info"}, "only ofa_ds is installed"
    for path in (
        "ofa_ds/kernels/resnet/csrc/bn_act_binding.cpp",
        "ofa_ds/kernels/resnet/csrc/bn_act_forward.cu",
        "ofa_ds/kernels/resnet/build.py",
        "ofa_ds/data/train_tokenizer.py",
        "ofa_ds/train/bench.py",
        "ofa_ds/dependencies.py",
        "ofa_ds/assets/ofa_bpe/encoder.json",
    ):
        assert path in names, path
    requires = [line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]
    assert {str(Requirement(r)) for r in D.INSTALL_REQUIRES} <= {str(Requirement(r)) for r in requires}

    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=False)
    python, ofa = tmp_path / "venv" / "bin" / "python", tmp_path / "venv" / "bin" / "ofa-ds"
    done = subprocess.run(
        ["bash", str(ROOT / "launch" / "install.sh"), "--wheelhouse", str(wheelhouse)],
        env={**_offline_env(), "PYTHON": str(python)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*args):
        done = subprocess.run(
            [str(a) for a in args], env=_offline_env(), cwd=work, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    where = run(
        python,
        "-c",
        "import ofa_ds; from ofa_ds.kernels.resnet import build; "
        "print(ofa_ds.__file__); print(build.ROOT); print(build.sources_present())",
    ).split()
    site = tmp_path / "venv" / "lib"
    assert Path(where[0]).is_relative_to(site) and Path(where[1]).is_relative_to(site) and where[2] == "True", where
    out = run(ofa, "env")
    assert f"ofa-ds env ({python})" in out and "  ofa-ds                 0.1.0" in out
    assert all(line in out for line in D.check_installed()) and "  apex  " in out, out
    run(
        ofa,
        "make-sample-corpus",
        "tsv",
        "--vl-rows",
        "16",
        "--text-rows",
        "4",
        "--image-rows",
        "2",
        "--detection-rows",
        "2",
    )
    run(ofa, "tsv2arrow", "tsv", "arrow")
    run(ofa, "train-tokenizer", "tok", "--corpus", "arrow", "--vocab-size", "300")
    assert (work / "arrow" / "manifest.json").is_file() and (work / "tok" / "tokenizer.json").is_file()
