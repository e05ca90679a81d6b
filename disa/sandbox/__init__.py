"""Run untrusted (model-written) Python programs in a separate, resource-limited process.

Rewards for code tasks execute model output. That code is never ``exec``-ed or ``eval``-ed in
the harness's own process: :func:`run_program` starts a fresh interpreter and applies, before
the untrusted code runs,

* resource limits: CPU seconds (``RLIMIT_CPU``), address space (``RLIMIT_AS``), size of any
  file written (``RLIMIT_FSIZE``, which also caps captured stdout/stderr), open files
  (``RLIMIT_NOFILE``), no core dumps (``RLIMIT_CORE=0``), optionally processes
  (``RLIMIT_NPROC``);
* a wall-clock limit enforced from the parent by killing the whole process group
  (``start_new_session=True`` + ``os.killpg``), so children the program forked die with it;
* a clean, minimal environment (no variable of the harness leaks: API keys, W&B tokens, ...),
  an isolated interpreter (``-I``: ignores ``PYTHON*`` variables and the user site; ``-S`` by
  default: no site-packages, so only the standard library is importable);
* a fresh temporary working directory, removed afterwards;
* no network where the OS allows it: ``unshare -rn`` (an unprivileged user + network
  namespace with only a downed loopback). Whether that works is detected once per process
  and cached; where it does not, the program runs with the network and the result says
  ``network_isolated=False``;
* where the kernel has Landlock (Linux 5.13+): no creating, writing, removing or renaming
  files outside the working directory, and (Landlock ABI 6, Linux 6.12+) no signals to
  processes outside the sandbox, so a program cannot kill the harness
  (``writes_confined``, ``signals_confined``);
* at most 64 processes at once (``max_processes``): a per-run ``pids`` cgroup where one can
  be made (as root, where ``RLIMIT_NPROC`` does not apply; the cgroup also finds children
  that left the process group with ``setsid``), else ``RLIMIT_NPROC`` inside the user
  namespace, where it counts only the sandbox's processes (``processes_limited``).

The limits are applied by a tiny bootstrap interpreter (``disa/sandbox/driver.py``, run as a
script by path) that calls ``setrlimit`` and then ``exec``-s the real interpreter, rather than
by ``subprocess``'s ``preexec_fn``: ``preexec_fn`` runs Python code between ``fork`` and
``exec`` and is documented as unsafe when the parent has threads, and graders call
:func:`run_program` from thread pools.

This is a guard against accidents and careless or reward-hacking programs (infinite loops,
fork and memory bombs, stray file writes, a network call, killing the parent), not a
hardened security boundary: the program still reads what the harness's user may read, and
on a kernel without Landlock or namespaces the corresponding guards are missing (each result
says which applied). Use a container or VM for adversarial code.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ExecResult",
    "network_isolation_available",
    "run_program",
]

#: Statuses an :class:`ExecResult` can carry.
STATUSES = ("ok", "error", "timeout", "memory", "file_size", "killed", "sandbox_error")

# Runs in the child before the untrusted program: joins the pids cgroup, sets the limits,
# applies Landlock, then execs a clean interpreter on the program so that nothing of the
# bootstrap stays in its process image. A real file run as a script by path under ``-I -S``
# (not ``-c``-code kept here): it imports only the standard library, never ``disa``, and
# takes everything it needs as one JSON argument (see its docstring, also for the limits).
_DRIVER = Path(__file__).with_name("driver.py")

#: exit status of the bootstrap when the requested confinement could not be applied
_CONFINE_FAILED = 121
#: processes a sandboxed program may have at once where a limit can be enforced
DEFAULT_MAX_PROCESSES = 64

_UNSHARE_LOCK = threading.Lock()
_UNSHARE_PREFIX: list[str] | None = None  # cached result of the detection; [] = unavailable
_UNSHARE_DETECTED = False


@dataclass
class ExecResult:
    """What happened to one sandboxed run.

    ``status``: ``"ok"`` (exit code 0), ``"error"`` (non-zero exit, e.g. an exception),
    ``"timeout"`` (wall clock or CPU limit), ``"memory"`` (``MemoryError`` under the
    address-space limit), ``"file_size"`` (a write hit the file-size limit), ``"killed"``
    (killed by a signal the sandbox did not send), ``"sandbox_error"`` (the sandbox itself
    could not start the program; nothing about the program is known).
    """

    status: str
    stdout: str
    stderr: str
    returncode: int | None
    wall_s: float
    network_isolated: bool = False
    truncated: bool = False  # stdout or stderr was longer than ``max_output_bytes``
    pid: int | None = None  # pid (= process-group id) of the program, for diagnostics
    info: dict = field(default_factory=dict)
    writes_confined: bool = False  # writes outside the working directory were refused (Landlock)
    signals_confined: bool = False  # signals to processes outside the sandbox were refused
    processes_limited: bool = False  # a process-count limit applied (pids cgroup or RLIMIT_NPROC)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _detect_unshare() -> list[str]:
    """The command prefix giving a user + network namespace, or [] where that fails."""
    if os.environ.get("DISA_SANDBOX_NO_UNSHARE"):
        return []
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return []
    prefix = [exe, "-rn"]
    try:
        # Probe with the interpreter we will run: some kernels allow the namespace but
        # forbid something later (e.g. uid mapping); only a full start counts.
        probe = subprocess.run(
            [*prefix, sys.executable, "-I", "-S", "-c", "pass"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=10,
            env={"PATH": "/usr/bin:/bin"},
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return prefix if probe.returncode == 0 else []


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 where there is none (not Linux, too old, off)."""
    global _LANDLOCK_ABI
    if _LANDLOCK_ABI is None:
        _LANDLOCK_ABI = 0
        if sys.platform.startswith("linux") and not os.environ.get("DISA_SANDBOX_NO_LANDLOCK"):
            import ctypes

            with contextlib.suppress(OSError, AttributeError):
                libc = ctypes.CDLL(None, use_errno=True)
                _LANDLOCK_ABI = max(
                    0, int(libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1)))
                )
    return _LANDLOCK_ABI


_LANDLOCK_ABI: int | None = None
_CGROUP_LOCK = threading.Lock()
_PIDS_BASE: list[str | None] = []  # [] = not detected yet; [None] = unavailable


def _own_pids_cgroup() -> str | None:
    """The directory of this process's cgroup under which a child with a ``pids.max`` can
    be made: the v1 ``pids`` hierarchy, or cgroup v2 where ``pids`` is delegated to children."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        v1 = f"/sys/fs/cgroup/pids{path.rstrip('/')}"
        if "pids" in controllers.split(",") and os.path.isdir(v1):
            return v1
    for line in lines:
        if line.startswith("0::"):
            path = line[3:].rstrip("/")
            for mount in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
                with contextlib.suppress(OSError):
                    if "pids" in Path(f"{mount}{path}/cgroup.subtree_control").read_text().split():
                        return f"{mount}{path}"
    return None


def pids_cgroup_base() -> str | None:
    """Where per-run ``pids`` cgroups can be created (usually only as root), detected once
    by creating and removing a probe cgroup; None where that is not possible."""
    with _CGROUP_LOCK:
        if not _PIDS_BASE:
            base = (
                None
                if os.environ.get("DISA_SANDBOX_NO_CGROUP") or not sys.platform.startswith("linux")
                else _own_pids_cgroup()
            )
            if base is not None:
                probe = os.path.join(base, f"disa-probe-{os.getpid()}")
                try:
                    os.mkdir(probe)
                    with open(os.path.join(probe, "pids.max"), "w") as f:
                        f.write("1")
                except OSError:
                    base = None
                finally:
                    with contextlib.suppress(OSError):
                        os.rmdir(probe)
            if base is not None:
                _remove_stale_cgroups(base)
            _PIDS_BASE.append(base)
        return _PIDS_BASE[0]


def _remove_stale_cgroups(base: str) -> None:
    """Remove the per-run cgroups a killed harness left behind (named after its pid); one
    still holding processes is emptied first."""
    for name in os.listdir(base):
        parts = name.split("-")
        if name.startswith("disa-sandbox-") and len(parts) >= 4 and parts[2].isdigit():
            pid = int(parts[2])
            if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
                _remove_pids_cgroup(os.path.join(base, name))


def _make_pids_cgroup(limit: int) -> str | None:
    base = pids_cgroup_base()
    if base is None:
        return None
    # cgroupfs: mkdir makes a cgroup; the pid in the name lets a later run clean up after a kill
    path = tempfile.mkdtemp(prefix=f"disa-sandbox-{os.getpid()}-", dir=base)
    with open(os.path.join(path, "pids.max"), "w") as f:
        f.write(str(int(limit)))
    return path


def _remove_pids_cgroup(path: str) -> None:
    """Kill whatever is left in the cgroup (also processes that left the process group with
    ``setsid``) and remove it; a cgroup still busy after a second is left for the OS."""
    for _ in range(50):
        with contextlib.suppress(OSError):
            for pid in Path(path, "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(pid), signal.SIGKILL)
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


def network_isolation_available() -> bool:
    """Whether ``unshare -rn`` works here (detected once per process, then cached)."""
    global _UNSHARE_PREFIX, _UNSHARE_DETECTED
    with _UNSHARE_LOCK:
        if not _UNSHARE_DETECTED:
            _UNSHARE_PREFIX = _detect_unshare()
            _UNSHARE_DETECTED = True
        return bool(_UNSHARE_PREFIX)


def _clean_env(workdir: str, extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        # UTF-8 stdio regardless of the host locale (-I ignores PYTHONIOENCODING).
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        # Native libraries a program may load should not spawn one thread per core.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    if extra:
        env.update({str(k): str(v) for k, v in extra.items()})
    return env


def _read_capped(path: str, cap: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    truncated = len(data) > cap
    return data[:cap].decode("utf-8", errors="replace"), truncated


def _rmtree(path: str) -> None:
    """Remove a directory the program may have made read-only."""

    def fix(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=fix)
    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _classify(returncode: int, stderr: str, we_killed: bool) -> str:
    if we_killed:
        return "timeout"
    if returncode == 0:
        return "ok"
    if returncode < 0:
        sig = -returncode
        if sig == signal.SIGXCPU:
            return "timeout"
        if sig == signal.SIGXFSZ:
            return "file_size"
        return "killed"
    tail = stderr[-2000:]
    if "MemoryError" in tail:
        return "memory"
    # CPython ignores SIGXFSZ, so an over-limit write surfaces as OSError EFBIG.
    if "File too large" in tail or "[Errno 27]" in tail:
        return "file_size"
    return "error"


def run_program(
    source: str,
    stdin: str = "",
    timeout_s: float = 5.0,
    memory_mb: int = 1024,
    *,
    cpu_s: float | None = None,
    file_size_mb: int = 16,
    max_open_files: int = 64,
    max_processes: int | None = None,
    max_output_bytes: int = 4 * 1024 * 1024,
    files: Mapping[str, str | bytes] | None = None,
    args: list[str] | None = None,
    env: Mapping[str, str] | None = None,
    isolate_network: bool = True,
    confine_writes: bool = True,
    require_network_isolation: bool = False,
    site_packages: bool = False,
    python: str | None = None,
) -> ExecResult:
    """Run the Python program ``source`` in a sandboxed child process.

    Args:
        source: the program's text (written to a file the interpreter runs).
        stdin: text fed to the program's standard input.
        timeout_s: wall-clock limit; past it the whole process group is killed.
        memory_mb: address-space limit (``RLIMIT_AS``) in MiB.
        cpu_s: CPU-seconds limit; default ``int(timeout_s) + 2`` (the wall clock is the
            main guard, this one stops a program that forks CPU burners).
        file_size_mb: largest file the program may write, stdout/stderr included.
        max_open_files: ``RLIMIT_NOFILE``.
        max_processes: most processes the program may have at once (a fork bomb fails to
            fork past it). Enforced by a ``pids`` cgroup where one can be created (as root,
            where ``RLIMIT_NPROC`` does not apply), else by ``RLIMIT_NPROC`` inside the user
            namespace (it then counts only the sandbox's processes). ``None``: 64 where
            either is available, else no limit (``RLIMIT_NPROC`` outside a namespace would
            count every process of the user). Set explicitly without either, it is
            ``RLIMIT_NPROC`` for the whole user.
        max_output_bytes: stdout and stderr are each returned up to this many bytes.
        files: extra files (name -> content) to place in the working directory.
        args: command-line arguments for the program.
        env: extra environment variables (the environment is otherwise minimal).
        isolate_network: use ``unshare -rn`` when available.
        confine_writes: where the kernel has Landlock, refuse writes (and creating,
            removing or renaming files) outside the working directory and, from Landlock
            ABI 6 on, signals to processes outside the sandbox (the harness survives a
            program that tries to kill its parent).
        require_network_isolation: raise ``RuntimeError`` instead of running with network.
        site_packages: let the program import installed packages (drops ``-S``).
        python: interpreter to use; default ``sys.executable``.

    Returns:
        An :class:`ExecResult`. Never raises for anything the program does.
    """
    python = python or sys.executable
    prefix: list[str] = []
    if isolate_network and network_isolation_available():
        prefix = list(_UNSHARE_PREFIX or [])
    if require_network_isolation and not prefix:
        raise RuntimeError("network isolation (unshare -rn) is not available on this machine")

    cpu = int(cpu_s) if cpu_s is not None else int(timeout_s) + 2
    cpu = max(cpu, 1)
    mem = int(memory_mb) * 1024 * 1024
    fsize = int(file_size_mb) * 1024 * 1024
    limits: dict[str, tuple[int, int]] = {
        "RLIMIT_CPU": (cpu, cpu + 1),
        "RLIMIT_AS": (mem, mem),
        "RLIMIT_FSIZE": (fsize, fsize),
        "RLIMIT_NOFILE": (max_open_files, max_open_files),
        "RLIMIT_CORE": (0, 0),
    }
    nproc = int(max_processes) if max_processes is not None else DEFAULT_MAX_PROCESSES
    # As root RLIMIT_NPROC is ignored: a pids cgroup (made below) limits instead. Inside the
    # user namespace RLIMIT_NPROC counts the sandbox's processes only; outside, every
    # process of the user, so there it applies only when asked for.
    use_cgroup = pids_cgroup_base() is not None
    if not use_cgroup and (prefix or max_processes is not None):
        limits["RLIMIT_NPROC"] = (nproc, nproc)
    flags = ["-I"] if site_packages else ["-I", "-S"]

    root = tempfile.mkdtemp(prefix="disa-sandbox-")
    # io/ holds the program text and the captured streams; work/ is the program's cwd.
    io_dir = os.path.join(root, "io")
    work_dir = os.path.join(root, "work")
    os.mkdir(io_dir)
    os.mkdir(work_dir)
    isolated = bool(prefix)
    t0 = time.monotonic()
    cgroup = None
    try:
        cgroup = _make_pids_cgroup(nproc) if use_cgroup else None
        script = os.path.join(io_dir, "main.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(source)
        for name, content in (files or {}).items():
            target = os.path.normpath(os.path.join(work_dir, name))
            if not target.startswith(work_dir + os.sep):
                raise ValueError(f"file name {name!r} escapes the working directory")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(target, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
                f.write(content)
        stdin_path = os.path.join(io_dir, "stdin")
        with open(stdin_path, "w", encoding="utf-8") as f:
            f.write(stdin)
        out_path = os.path.join(io_dir, "stdout")
        err_path = os.path.join(io_dir, "stderr")
        abi = landlock_abi() if confine_writes else 0
        spec = json.dumps(
            {
                "limits": limits,
                "python": python,
                "flags": flags,
                "landlock_abi": abi,
                "writable": [work_dir],
                "cgroup": cgroup,
            }
        )
        cmd = [*prefix, python, "-I", "-S", str(_DRIVER), spec, script, *(args or [])]

        # Files rather than pipes: no reader threads, no pipe deadlock, and RLIMIT_FSIZE
        # bounds how much a chatty program can make the harness hold.
        we_killed = False
        with (
            open(stdin_path, "rb") as fin,
            open(out_path, "wb") as fout,
            open(err_path, "wb") as ferr,
        ):
            t0 = time.monotonic()
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdin=fin,
                    stdout=fout,
                    stderr=ferr,
                    cwd=work_dir,
                    env=_clean_env(work_dir, env),
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as e:
                return ExecResult(
                    "sandbox_error",
                    "",
                    f"could not start the sandbox: {e}",
                    None,
                    time.monotonic() - t0,
                    isolated,
                )
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                we_killed = True
                _kill_group(proc.pid)
                proc.wait()
            finally:
                # Also after a normal exit: background children left in the group die too.
                _kill_group(proc.pid)
            wall = time.monotonic() - t0
        stdout, t_out = _read_capped(out_path, max_output_bytes)
        stderr, t_err = _read_capped(err_path, max_output_bytes)
        rc = proc.returncode
        status = _classify(rc, stderr, we_killed)
        if isolated and rc != 0 and "unshare:" in stderr[:500] and not stdout:
            # unshare itself failed (e.g. namespaces disabled since detection).
            status = "sandbox_error"
        if rc == _CONFINE_FAILED and stderr.startswith("sandbox: could not"):
            status = "sandbox_error"
        return ExecResult(
            status,
            stdout,
            stderr,
            rc,
            wall,
            isolated,
            t_out or t_err,
            proc.pid,
            writes_confined=abi >= 1,
            signals_confined=abi >= 6,
            processes_limited=cgroup is not None or "RLIMIT_NPROC" in limits,
        )
    finally:
        if cgroup is not None:
            _remove_pids_cgroup(cgroup)
        _rmtree(root)
