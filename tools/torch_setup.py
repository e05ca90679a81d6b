"""Which torch ``make setup`` installs into the venv: the CPU build, a CUDA build, or none
(the torch already there is kept).

    python tools/torch_setup.py --version 2.13.0 --variant auto      # what `make setup` runs
    python tools/torch_setup.py --variant cpu --dry-run               # print the choice only

``--variant`` (``TORCH_VARIANT`` in the Makefile):

- ``auto`` (default): a torch already importable from the venv is kept (a GPU node's own build,
  e.g. with ``VENV_FLAGS=--system-site-packages``). Otherwise, without an NVIDIA driver, the CPU
  build from PyTorch's CPU wheel index (``<index>/cpu``); with one, PyPI's default build (CUDA 13
  for torch 2.13 on Linux x86_64), refused if the driver is too old to run it.
- ``cpu``, ``cu126``, ``cu128``, ``cu130``, ``rocm6.4``, …: that build from ``<index>/<variant>``,
  unless the venv already holds exactly that version and build.

The CPU build is about 180 MiB; PyPI's CUDA build pulls in about 2.5 GiB of NVIDIA libraries,
which a CPU-only machine cannot use. On macOS PyPI's wheel is the CPU (and MPS) build, so it
is taken from PyPI.

The decision is :func:`choose`, a pure function of the request and of what :func:`probe`
found on the machine; it is what ``tests/test_torch_setup.py`` checks. Standard library only:
it runs in a fresh venv, before anything else is installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

#: PyTorch's wheel indexes, one per build: <index>/cpu, <index>/cu128, …
DEFAULT_INDEX = "https://download.pytorch.org/whl"
VARIANT = re.compile(r"^(auto|cpu|cu\d{3}|rocm\d+(\.\d+)*)$")
#: CUDA major version of PyPI's Linux x86_64 wheel, for the releases this project pins (read
#: off the nvidia-cuda-runtime version each wheel requires); other releases are not checked
PYPI_CUDA_MAJOR = {"2.13": 13, "2.14": 13}
#: present while an NVIDIA kernel driver is loaded (Linux); nvidia-smi covers WSL
NVIDIA_PROC = Path("/proc/driver/nvidia/version")


@dataclass(frozen=True)
class Machine:
    """What the choice depends on."""

    installed: str | None  #: torch's version in the venv ("2.13.0+cpu", "2.11.0"), None if absent
    nvidia_driver: bool  #: an NVIDIA driver is loaded
    driver_cuda: tuple[int, int] | None = (
        None  #: newest CUDA the driver runs (nvidia-smi), if known
    )
    system: str = "Linux"  #: platform.system()


@dataclass(frozen=True)
class Choice:
    """Keep the venv's torch (``requirement`` None) or install ``requirement`` (from
    ``index`` as an extra index, or from the configured indexes when ``index`` is None)."""

    requirement: str | None
    index: str | None
    reason: str

    def pip_commands(self) -> list[list[str]]:
        """The ``pip`` argument lists to run, in order. From a PyTorch index, torch alone
        (``--no-deps``), then its requirements from the configured indexes: torch's index is asked
        for torch only, never for the common packages it also mirrors."""
        if self.requirement is None:
            return []
        if self.index is None:
            return [["install", self.requirement]]
        return [
            ["install", "--no-deps", self.requirement, "--extra-index-url", self.index],
            ["install", self.requirement],
        ]


class SetupError(ValueError):
    """The request cannot be met on this machine (the message says what to set)."""


def choose(version: str, variant: str, machine: Machine, index: str = DEFAULT_INDEX) -> Choice:
    """The torch to install (or keep) for ``version`` and ``variant`` on ``machine``."""
    if not VARIANT.match(variant):
        raise SetupError(
            f"TORCH_VARIANT={variant!r} is invalid; allowed: auto, cpu, cuXYZ (a CUDA build, e.g. "
            f"cu126, cu128, cu130) or rocmX.Y, as listed under {index}/"
        )
    index = index.rstrip("/")
    installed = machine.installed
    if variant == "auto":
        if installed:
            return Choice(
                None,
                None,
                f"torch {installed} is already in the venv: kept "
                "(TORCH_VARIANT=cpu or cuXYZ replaces it)",
            )
        if not machine.nvidia_driver:
            return _build(version, "cpu", machine, index, "no NVIDIA driver found: ")
        _check_driver(version, machine)
        return Choice(
            f"torch=={version}",
            None,
            f"an NVIDIA driver is present: PyPI's torch {version} (its default CUDA build; "
            "TORCH_VARIANT=cuXYZ picks another)",
        )
    return _build(version, variant, machine, index)


def _build(version: str, variant: str, machine: Machine, index: str, why: str = "") -> Choice:
    """Install (or keep) the ``variant`` build of ``version``; ``why`` prefixes the reason."""
    installed = machine.installed
    if variant == "cpu" and machine.system == "Darwin":  # PyPI's macOS wheel is the CPU/MPS build
        if installed and _public(installed) == version:
            return Choice(None, None, f"torch {installed} is already in the venv: kept")
        return Choice(
            f"torch=={version}", None, f"{why}macOS: PyPI's torch {version} (CPU and MPS)"
        )
    wanted = f"{version}+{variant}"
    if installed == wanted:
        return Choice(None, None, f"torch {installed} is already in the venv: kept")
    what = "the CPU build" if variant == "cpu" else f"the {variant} build"
    if not machine.nvidia_driver and variant != "cpu":
        what += " (no NVIDIA driver found here)"
    return Choice(
        f"torch=={wanted}",
        f"{index}/{variant}",
        f"{why}{what} of torch {version} from {index}/{variant}",
    )


def _public(version: str) -> str:
    return version.split("+", 1)[0]


def _check_driver(version: str, machine: Machine) -> None:
    """Refuse PyPI's CUDA build where the driver is known to be too old for it."""
    needed = PYPI_CUDA_MAJOR.get(".".join(version.split(".")[:2]))
    have = machine.driver_cuda
    if needed and have and have[0] < needed:
        raise SetupError(
            f"the NVIDIA driver runs CUDA up to {have[0]}.{have[1]}, but PyPI's torch {version} is built for CUDA "
            f"{needed}: set TORCH_VARIANT to a build the driver runs (e.g. TORCH_VARIANT=cu{have[0]}{have[1]}, if "
            f"{DEFAULT_INDEX}/cu{have[0]}{have[1]} has torch {version}), or upgrade the driver"
        )


def parse_driver_cuda(nvidia_smi_output: str) -> tuple[int, int] | None:
    """The ``CUDA Version: 12.4`` of ``nvidia-smi``'s header: the newest CUDA the driver runs."""
    m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", nvidia_smi_output)
    return (int(m.group(1)), int(m.group(2))) if m else None


def probe() -> Machine:
    """This machine: the torch importable from this interpreter, and the NVIDIA driver."""
    try:
        installed = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    smi = shutil.which("nvidia-smi")
    driver_cuda = None
    if smi:
        try:
            out = subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout
            driver_cuda = parse_driver_cuda(out)
        except (OSError, subprocess.SubprocessError):
            pass
    return Machine(
        installed, NVIDIA_PROC.exists() or smi is not None, driver_cuda, platform.system()
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--version", default="2.13.0", help="torch release (TORCH_VERSION)")
    p.add_argument("--variant", default="auto", help="auto | cpu | cuXYZ | rocmX.Y (TORCH_VARIANT)")
    p.add_argument(
        "--index",
        default=DEFAULT_INDEX,
        help="root of PyTorch's per-build wheel indexes (TORCH_INDEX)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the choice and the pip command, install nothing",
    )
    a = p.parse_args(argv)
    try:
        choice = choose(a.version.strip(), a.variant.strip(), probe(), a.index.strip())
    except SetupError as e:
        print(f"torch_setup: {e}", file=sys.stderr)
        return 2
    cmds = [[sys.executable, "-m", "pip", *args] for args in choice.pip_commands()]
    print("\n  ".join([f"torch: {choice.reason}", *(" ".join(c) for c in cmds)]), flush=True)
    for cmd in [] if a.dry_run else cmds:
        rc = subprocess.run(cmd).returncode
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
