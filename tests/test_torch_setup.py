"""The set-up's choice of torch (tools/torch_setup.py): driver present or absent, torch already
in the venv or not, the explicit TORCH_VARIANT, and the refusals."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "torch_setup.py"
spec = importlib.util.spec_from_file_location("torch_setup", SCRIPT)
ts = importlib.util.module_from_spec(spec)
sys.modules["torch_setup"] = ts  # dataclasses resolve their module by name
spec.loader.exec_module(ts)

INDEX = "https://download.pytorch.org/whl"


def machine(installed=None, driver=False, cuda=None, system="Linux"):
    return ts.Machine(installed=installed, nvidia_driver=driver, driver_cuda=cuda, system=system)


def test_auto_without_driver_takes_the_cpu_build_from_the_cpu_index():
    c = ts.choose("2.13.0", "auto", machine())
    assert c.requirement == "torch==2.13.0+cpu"
    assert c.index == f"{INDEX}/cpu"
    # torch alone from its index, then its requirements from the configured ones
    assert c.pip_commands() == [
        ["install", "--no-deps", "torch==2.13.0+cpu", "--extra-index-url", f"{INDEX}/cpu"],
        ["install", "torch==2.13.0+cpu"],
    ]


def test_auto_with_driver_takes_pypis_default_build():
    c = ts.choose("2.13.0", "auto", machine(driver=True, cuda=(13, 0)))
    assert (c.requirement, c.index) == ("torch==2.13.0", None)
    assert c.pip_commands() == [["install", "torch==2.13.0"]]


@pytest.mark.parametrize("driver", [False, True])
@pytest.mark.parametrize("installed", ["2.13.0+cpu", "2.11.0", "2.12.1+cu126"])
def test_auto_keeps_any_torch_already_there(installed, driver):
    c = ts.choose("2.13.0", "auto", machine(installed=installed, driver=driver))
    assert c.requirement is None and c.pip_commands() == []
    assert installed in c.reason


def test_auto_refuses_pypis_cuda_build_on_a_driver_too_old_for_it():
    with pytest.raises(
        ts.SetupError, match=r"CUDA up to 12\.4.*built for CUDA 13.*TORCH_VARIANT=cu124"
    ):
        ts.choose("2.13.0", "auto", machine(driver=True, cuda=(12, 4)))
    # a driver of the same major version runs it (CUDA minor-version compatibility)
    assert (
        ts.choose("2.13.0", "auto", machine(driver=True, cuda=(13, 0))).requirement
        == "torch==2.13.0"
    )
    # releases whose PyPI build is not recorded are not checked; an unknown driver is not refused
    assert (
        ts.choose("2.99.0", "auto", machine(driver=True, cuda=(11, 8))).requirement
        == "torch==2.99.0"
    )
    assert (
        ts.choose("2.13.0", "auto", machine(driver=True, cuda=None)).requirement == "torch==2.13.0"
    )


@pytest.mark.parametrize("variant", ["cpu", "cu126", "cu130", "rocm6.4"])
def test_explicit_variant_installs_that_build_from_its_index(variant):
    for m in (machine(), machine(driver=True, cuda=(13, 0)), machine(installed="2.13.0")):
        c = ts.choose("2.13.0", variant, m)
        assert c.requirement == f"torch==2.13.0+{variant}"
        assert c.index == f"{INDEX}/{variant}"


def test_explicit_variant_keeps_exactly_that_version_and_build_only():
    assert (
        ts.choose("2.13.0", "cu128", machine(installed="2.13.0+cu128", driver=True)).requirement
        is None
    )
    assert ts.choose("2.13.0", "cpu", machine(installed="2.13.0+cpu")).requirement is None
    # another build or another release is replaced
    assert (
        ts.choose("2.13.0", "cpu", machine(installed="2.13.0+cu128")).requirement
        == "torch==2.13.0+cpu"
    )
    assert (
        ts.choose("2.13.0", "cpu", machine(installed="2.12.0+cpu")).requirement
        == "torch==2.13.0+cpu"
    )


def test_a_cuda_build_without_a_driver_says_so():
    assert "no NVIDIA driver" in ts.choose("2.13.0", "cu128", machine()).reason


def test_macos_takes_pypis_wheel_which_is_the_cpu_build():
    c = ts.choose("2.13.0", "auto", machine(system="Darwin"))
    assert (c.requirement, c.index) == ("torch==2.13.0", None)
    assert (
        ts.choose("2.13.0", "cpu", machine(installed="2.13.0", system="Darwin")).requirement is None
    )


def test_another_index_root_is_used_for_every_build():
    c = ts.choose("2.13.0", "cpu", machine(), index="https://mirror.example/torch/")
    assert c.index == "https://mirror.example/torch/cpu"


@pytest.mark.parametrize("variant", ["", "gpu", "cuda", "cu12", "CPU", "cpu "])
def test_bad_variant_is_refused_naming_the_setting_and_the_allowed_values(variant):
    with pytest.raises(
        ts.SetupError, match=r"TORCH_VARIANT=.* is invalid; allowed: auto, cpu, cuXYZ"
    ):
        ts.choose("2.13.0", variant, machine())


def test_parse_driver_cuda_from_nvidia_smi_header():
    header = (
        "+-----------------------------------------------------------------------------------------+\n"
        "| NVIDIA-SMI 580.159.03             Driver Version: 580.159.03     CUDA Version: 13.0     |\n"
    )
    assert ts.parse_driver_cuda(header) == (13, 0)
    assert ts.parse_driver_cuda(
        "| NVIDIA-SMI 550.54  Driver Version: 550.54  CUDA Version: 12.4 |"
    ) == (12, 4)
    assert (
        ts.parse_driver_cuda(
            "NVIDIA-SMI has failed because it couldn't communicate with the driver"
        )
        is None
    )


def test_probe_reads_the_driver_and_the_installed_torch(monkeypatch, tmp_path):
    monkeypatch.setattr(ts.shutil, "which", lambda name: None)
    monkeypatch.setattr(ts, "NVIDIA_PROC", tmp_path / "absent")
    monkeypatch.setattr(ts.importlib.metadata, "version", lambda name: "2.13.0+cpu")
    m = ts.probe()
    assert (m.installed, m.nvidia_driver, m.driver_cuda) == ("2.13.0+cpu", False, None)
    (tmp_path / "version").write_text(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.03\n"
    )
    monkeypatch.setattr(ts, "NVIDIA_PROC", tmp_path / "version")

    def missing(name):
        raise ts.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(ts.importlib.metadata, "version", missing)
    m = ts.probe()
    assert (m.installed, m.nvidia_driver) == (None, True)


def test_cli_dry_run_prints_the_pip_command_and_installs_nothing():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--version", "9.9.9", "--variant", "cpu", "--dry-run"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "the CPU build of torch 9.9.9" in out
    assert f"-m pip install --no-deps torch==9.9.9+cpu --extra-index-url {INDEX}/cpu\n" in out
    assert out.rstrip().endswith("-m pip install torch==9.9.9+cpu")
    bad = subprocess.run(
        [sys.executable, str(SCRIPT), "--variant", "gpu", "--dry-run"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "TORCH_VARIANT='gpu' is invalid" in bad.stderr
