"""Run untrusted (model-written) Python programs in a separate, confined process.

Rewards for code tasks execute model output, and RL trains a policy to find whatever earns
reward, so the program is treated as an adversary that wants to be graded well. It is never
``exec``-ed or ``eval``-ed in the harness's own process: :func:`run_program` starts a
bootstrap (``disa/sandbox/driver.py``, whose docstring has the process tree and the status
channel) that applies, before the untrusted code runs:

* **resource limits**: CPU seconds (``RLIMIT_CPU``), address space per process
  (``RLIMIT_AS``), size of any file written (``RLIMIT_FSIZE``, which also caps captured
  stdout/stderr), open files, no core dumps;
* **one memory budget** for the program and every process it starts: a per-run ``memory``
  cgroup (``memory_mb``; exceeding it is status ``"memory"``, even when the program survives
  the loss of a child), and **one process budget**: a ``pids`` cgroup, else ``RLIMIT_NPROC``
  inside the user namespace (``max_processes``, default 64);
* **namespaces** (user, mount, network, pid): no network (a fresh network namespace whose
  loopback is down); the working directory is a tmpfs of ``disk_mb`` (**one disk budget**,
  gone with the namespace); the program is not pid 1 but its init is, so when the run ends,
  or the harness dies, every process it started dies, ``setsid`` or not; and it runs as an
  unprivileged user of the namespace, with no capabilities;
* **Landlock** (Linux 5.13+): reads confined to the interpreter, the system libraries and
  the run's own files (benchmark files, reference solutions, ``$HOME``, the project are out
  of reach); writes to the working directory; from ABI 4, no TCP; from ABI 6, no signals to
  processes outside the sandbox and no abstract Unix sockets;
* **seccomp**: no Unix-domain sockets (a local daemon's socket file is out of reach);
* a clean, minimal environment and an isolated interpreter (``-I``, and ``-S`` by default:
  only the standard library);
* a wall-clock limit: the harness kills the whole process group, and the namespace with it.

A guard this machine lacks is reported on every result (:data:`GUARDS`; e.g. no memory
cgroup without root or a delegated cgroup), and ``require=`` refuses to run without the
guards named. How the program ended comes from the status channel, which the program cannot
write to: nothing it prints can pass for a failure of the sandbox, nor a failure of the
sandbox for a result of the program.

What this does not guarantee: it is not a VM. A kernel bug can break any of these guards;
the program can use CPU and memory up to its limits, read the interpreter's and the system
libraries' files, and learn what is in its own working directory and environment; where a
guard is missing, its protection is missing (the result says which).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

__all__ = [
    "GUARDS",
    "ExecResult",
    "SandboxUnavailable",
    "available_guards",
    "landlock_abi",
    "missing_guards",
    "network_isolation_available",
    "run_program",
]

#: Statuses an :class:`ExecResult` can carry.
STATUSES = ("ok", "error", "timeout", "memory", "file_size", "killed", "sandbox_error")

#: The guards a run can have, each a boolean field of :class:`ExecResult`.
GUARDS = (
    "network_isolated",  # a network namespace: no network at all
    "reads_confined",  # Landlock: reads only of the interpreter, system libraries, own files
    "writes_confined",  # Landlock: writes only in the working directory
    "signals_confined",  # Landlock ABI 6: no signals to processes outside the sandbox
    "unix_sockets_blocked",  # seccomp: no Unix-domain sockets
    "processes_limited",  # a pids cgroup or RLIMIT_NPROC in the user namespace
    "memory_limited",  # a memory cgroup: one budget for all the program's processes
    "disk_limited",  # the working directory is a size-limited tmpfs
    "tree_contained",  # a pid namespace: every process dies with the run or the harness
)

_DRIVER = Path(__file__).with_name("driver.py")
#: exit status of the bootstrap when the requested confinement could not be applied
_CONFINE_FAILED = 121
#: processes a sandboxed program may have at once where a limit can be enforced
DEFAULT_MAX_PROCESSES = 64
#: processes of the bootstrap (outer, init) beside the program's
_BOOTSTRAP_PROCESSES = 2
#: MiB of the memory cgroup beyond ``memory_mb``: the bootstrap's two interpreters and room
#: for the page cache of the interpreter's own files (a budget without it makes a program
#: near its limit thrash, re-reading them, rather than fail)
_BOOTSTRAP_MB = 64
#: prefix of the per-run directories and cgroups; the harness's pid follows, so that a later
#: harness can remove what a killed one left
_PREFIX = "disa-sandbox-"


class SandboxUnavailable(RuntimeError):
    """A guard that was required is missing on this machine."""


@dataclass
class ExecResult:
    """What happened to one sandboxed run.

    ``status``: ``"ok"`` (exit code 0), ``"error"`` (non-zero exit, e.g. an exception),
    ``"timeout"`` (wall clock or CPU limit), ``"memory"`` (``MemoryError`` under the
    address-space limit, or the memory budget of the whole program exceeded), ``"file_size"``
    (a write hit the file-size limit), ``"killed"`` (killed by a signal the sandbox did not
    send), ``"sandbox_error"`` (the sandbox could not start the program; nothing about the
    program is known). The guard fields (:data:`GUARDS`) say what confined this run.
    """

    status: str
    stdout: str
    stderr: str
    returncode: int | None
    wall_s: float
    network_isolated: bool = False
    truncated: bool = False  # stdout or stderr was longer than ``max_output_bytes``
    pid: int | None = None  # pid (= process-group id) of the sandbox's bootstrap, for diagnostics
    info: dict = field(default_factory=dict)
    writes_confined: bool = False
    signals_confined: bool = False
    processes_limited: bool = False
    reads_confined: bool = False
    unix_sockets_blocked: bool = False
    memory_limited: bool = False
    disk_limited: bool = False
    tree_contained: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def guards(self) -> dict[str, bool]:
        return {g: bool(getattr(self, g)) for g in GUARDS}


assert set(GUARDS) <= {f.name for f in fields(ExecResult)}


# -- what this machine offers ---------------------------------------------------------------
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
_DETECT_LOCK = threading.Lock()
_NAMESPACES: list[bool] = []  # [] = not detected yet


def network_isolation_available() -> bool:
    """Whether the sandbox's namespaces (user, mount, network, pid) can be created here:
    detected once per process by starting a trivial program in them."""
    with _DETECT_LOCK:
        if not _NAMESPACES:
            ok = False
            if sys.platform.startswith("linux") and not os.environ.get(
                "DISA_SANDBOX_NO_NAMESPACES"
            ):
                r = run_program("pass", timeout_s=10, _confine=(True, 0, False, {}))
                ok = r.status == "ok"
            _NAMESPACES.append(ok)
        return _NAMESPACES[0]


def _seccomp_available() -> bool:
    return (
        sys.platform.startswith("linux")
        and os.uname().machine in ("x86_64", "aarch64")
        and not os.environ.get("DISA_SANDBOX_NO_SECCOMP")
    )


def available_guards(site_packages: bool = False) -> dict[str, bool]:
    """The guards a run on this machine gets, by name (:data:`GUARDS`)."""
    ns, abi = network_isolation_available(), landlock_abi()
    nproc = cgroup_base("pids") is not None or (ns and os.getuid() != 0)
    return {
        "network_isolated": ns,
        "reads_confined": abi >= 1,
        "writes_confined": abi >= 1,
        "signals_confined": abi >= 6,
        "unix_sockets_blocked": _seccomp_available(),
        "processes_limited": nproc,
        "memory_limited": cgroup_base("memory") is not None,
        "disk_limited": ns,
        "tree_contained": ns,
    }


def missing_guards(required: Iterable[str] = GUARDS) -> list[str]:
    """The guards of ``required`` this machine cannot give a sandboxed run."""
    required = list(required)
    unknown = sorted(set(required) - set(GUARDS))
    if unknown:
        raise ValueError(f"unknown sandbox guard(s) {unknown}; allowed: {list(GUARDS)}")
    have = available_guards()
    return [g for g in required if not have[g]]


# -- cgroups ----------------------------------------------------------------------------------
#: per controller: the files that set a run's limit (cgroup v1 name, v2 name)
_CONTROLLERS = {"pids": ("pids.max", "pids.max"), "memory": ("memory.limit_in_bytes", "memory.max")}
_CGROUP_BASES: dict[str, str | None] = {}


def _own_cgroup(controller: str) -> str | None:
    """The directory of this process's cgroup under which a child cgroup with ``controller``
    can be made: its v1 hierarchy, or cgroup v2 where the controller is delegated."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        v1 = f"/sys/fs/cgroup/{controller}{path.rstrip('/')}"
        if controller in controllers.split(",") and os.path.isdir(v1):
            return v1
    for line in lines:
        if line.startswith("0::"):
            path = line[3:].rstrip("/")
            for mount in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
                with contextlib.suppress(OSError):
                    if (
                        controller
                        in Path(f"{mount}{path}/cgroup.subtree_control").read_text().split()
                    ):
                        return f"{mount}{path}"
    return None


def cgroup_base(controller: str) -> str | None:
    """Where per-run ``controller`` cgroups can be created (usually only as root), detected
    once by creating and removing a probe; None where that is not possible. The first
    detection also removes the cgroups and directories that killed harnesses left."""
    with _DETECT_LOCK:
        if controller not in _CGROUP_BASES:
            base = (
                None
                if os.environ.get("DISA_SANDBOX_NO_CGROUP") or not sys.platform.startswith("linux")
                else _own_cgroup(controller)
            )
            if base is not None:
                probe = os.path.join(base, f"disa-probe-{os.getpid()}")
                try:
                    os.mkdir(probe)
                    limit = next(
                        n
                        for n in _CONTROLLERS[controller]
                        if os.path.exists(os.path.join(probe, n))
                    )
                    with open(os.path.join(probe, limit), "w") as f:
                        f.write("1" if controller == "pids" else str(64 * 1024 * 1024))
                except (OSError, StopIteration):
                    base = None
                finally:
                    with contextlib.suppress(OSError):
                        os.rmdir(probe)
            if base is not None:
                _remove_stale(base, _remove_cgroup)
            _CGROUP_BASES[controller] = base
        return _CGROUP_BASES[controller]


def pids_cgroup_base() -> str | None:
    return cgroup_base("pids")


def _remove_stale(base: str, remove) -> None:
    """Remove what a killed harness left in ``base`` (named after its pid, now gone)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(base):
            parts = name.split("-")
            if name.startswith(_PREFIX) and len(parts) >= 4 and parts[2].isdigit():
                pid = int(parts[2])
                if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
                    remove(os.path.join(base, name))


def _remove_stale_cgroups(base: str) -> None:
    _remove_stale(base, _remove_cgroup)


def _make_cgroup(controller: str, limit: int) -> str | None:
    base = cgroup_base(controller)
    if base is None:
        return None
    # cgroupfs: mkdir makes a cgroup
    path = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=base)
    v1, v2 = _CONTROLLERS[controller]
    name = v1 if os.path.exists(os.path.join(path, v1)) else v2
    with open(os.path.join(path, name), "w") as f:
        f.write(str(int(limit)))
    for swap in ("memory.memsw.limit_in_bytes", "memory.swap.max"):  # the budget is RAM + swap
        with contextlib.suppress(OSError), open(os.path.join(path, swap), "w") as f:
            f.write(str(int(limit)) if swap.endswith("bytes") else "0")
    return path


def _oom_kills(cgroup: str | None) -> int:
    """Processes the kernel killed for exceeding the cgroup's memory budget."""
    if cgroup is None:
        return 0
    for name in ("memory.events", "memory.oom_control"):
        with contextlib.suppress(OSError):
            for line in Path(cgroup, name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    return 0


def _remove_cgroup(path: str) -> None:
    """Kill whatever is left in the cgroup and remove it; one still busy after a second is
    left for the OS (or the next harness)."""
    for _ in range(50):
        with contextlib.suppress(OSError):
            for pid in Path(path, "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(pid), 9)
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


_remove_pids_cgroup = _remove_cgroup


# -- running ----------------------------------------------------------------------------------
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


#: what any program may read besides its interpreter and its own files: the dynamic
#: loader's libraries and cache, time zones, random devices
_SYSTEM_READABLE = (
    "/lib",
    "/lib64",
    "/lib32",
    "/usr/lib",
    "/usr/lib64",
    "/usr/lib32",
    "/usr/local/lib",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/usr/share/zoneinfo",
    "/dev/urandom",
    "/dev/random",
    "/dev/zero",
)


def _readable(python: str, site_packages: bool, extra: Iterable[str]) -> list[str]:
    """Paths a program run by ``python`` may read: its installation (and, with
    ``site_packages``, the installed packages), the system's libraries, and ``extra``."""
    real = os.path.realpath(python)
    paths = {
        os.path.dirname(os.path.dirname(real)),
        os.path.join(os.path.dirname(os.path.dirname(python)), "pyvenv.cfg"),
    }
    if real == os.path.realpath(sys.executable):
        paths |= {sys.base_prefix, sys.base_exec_prefix, os.path.join(sys.prefix, "pyvenv.cfg")}
        if site_packages:
            paths |= {
                *site.getsitepackages(),
                sysconfig.get_paths()["purelib"],
                sysconfig.get_paths()["platlib"],
            }
    return sorted({*paths, *_SYSTEM_READABLE, *extra})


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


_STALE_ROOTS_CHECKED: list[bool] = []


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, 9)


def _read_status(fd: int) -> list[dict]:
    """The status channel's records (the bootstrap's; the program cannot write to it)."""
    os.set_blocking(fd, False)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            data += chunk
    records = []
    for line in data.decode("utf-8", "replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            obj = json.loads(line)
            if isinstance(obj, dict):
                records.append(obj)
    return records


def _classify(returncode: int | None, stderr: str, we_killed: bool, oom: bool) -> str:
    if oom:
        return "memory"
    if we_killed:
        return "timeout"
    if returncode is None:  # init was killed from outside (or the program lost its init)
        return "killed"
    if returncode == 0:
        return "ok"
    if returncode < 0:
        sig = -returncode
        if sig == 24:  # SIGXCPU
            return "timeout"
        if sig == 25:  # SIGXFSZ
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
    disk_mb: int = 64,
    max_open_files: int = 64,
    max_processes: int | None = None,
    max_output_bytes: int = 4 * 1024 * 1024,
    files: Mapping[str, str | bytes] | None = None,
    args: list[str] | None = None,
    env: Mapping[str, str] | None = None,
    readable: Iterable[str] = (),
    isolate_network: bool = True,
    confine_writes: bool = True,
    require: Iterable[str] = (),
    require_network_isolation: bool = False,
    site_packages: bool = False,
    python: str | None = None,
    _confine: tuple[bool, int, bool, Mapping[str, int]] | None = None,
) -> ExecResult:
    """Run the Python program ``source`` in a sandboxed child process.

    Args:
        source: the program's text (written to a file the interpreter runs).
        stdin: text fed to the program's standard input.
        timeout_s: wall-clock limit; past it the whole process group is killed.
        memory_mb: memory budget in MiB: the address-space limit of each process and, where
            a memory cgroup can be made, the limit of all its processes together.
        cpu_s: CPU-seconds limit; default ``int(timeout_s) + 2`` (the wall clock is the
            main guard, this one stops a program that forks CPU burners).
        file_size_mb: largest file the program may write, stdout/stderr included.
        disk_mb: size of the working directory (a tmpfs) for all the program's files.
        max_open_files: ``RLIMIT_NOFILE``.
        max_processes: most processes the program may have at once (a fork bomb fails to
            fork past it): a ``pids`` cgroup where one can be created (as root, where
            ``RLIMIT_NPROC`` does not apply), else ``RLIMIT_NPROC`` inside the user
            namespace. ``None``: 64 where either is available, else no limit.
        max_output_bytes: stdout and stderr are each returned up to this many bytes.
        files: extra files (name -> content) to place in the working directory.
        args: command-line arguments for the program.
        env: extra environment variables (the environment is otherwise minimal).
        readable: further paths the program may read (files or directories).
        isolate_network: use the namespaces (network, mount, pid) where available.
        confine_writes: use Landlock where available (reads, writes, signals, TCP).
        require: guards (:data:`GUARDS`) without which the program must not run: raise
            :class:`SandboxUnavailable` instead.
        require_network_isolation: shorthand for ``require=["network_isolated"]``.
        site_packages: let the program import installed packages (drops ``-S``).
        python: interpreter to use; default ``sys.executable``.
        _confine: the guards decided by the caller instead of detected (the detection's own
            probe): ``(namespaces, landlock ABI, seccomp, {cgroup controller: limit})``.

    Returns:
        An :class:`ExecResult`. Never raises for anything the program does.
    """
    required = [*require, *(["network_isolated"] if require_network_isolation else [])]
    missing = missing_guards(required) if required else []
    if not isolate_network:
        missing += [
            g for g in ("network_isolated", "disk_limited", "tree_contained") if g in required
        ]
    if not confine_writes:
        missing += [
            g for g in ("reads_confined", "writes_confined", "signals_confined") if g in required
        ]
    if missing:
        raise SandboxUnavailable(
            f"the sandbox on this machine lacks {sorted(set(missing))}, which this run requires "
            "(user namespaces, Landlock, cgroups: see disa/sandbox/__init__.py)"
        )
    if _confine is None:
        nproc = int(max_processes) if max_processes is not None else DEFAULT_MAX_PROCESSES
        # the bootstrap's outer and init processes live in the same budgets as the program
        cgroups = {
            "pids": nproc + _BOOTSTRAP_PROCESSES,
            "memory": (int(memory_mb) + _BOOTSTRAP_MB) * 2**20,
        }
        _confine = (
            isolate_network and network_isolation_available(),
            landlock_abi() if confine_writes else 0,
            _seccomp_available(),
            cgroups,
        )
    namespaces, landlock, seccomp, cgroups = _confine
    python = python or sys.executable
    cpu = max(int(cpu_s) if cpu_s is not None else int(timeout_s) + 2, 1)
    mem, fsize = int(memory_mb) * 1024 * 1024, int(file_size_mb) * 1024 * 1024
    limits: dict[str, tuple[int, int]] = {
        "RLIMIT_CPU": (cpu, cpu + 1),  # SIGXCPU at the soft limit; SIGKILL at the hard one
        "RLIMIT_AS": (mem, mem),
        "RLIMIT_FSIZE": (fsize, fsize),
        "RLIMIT_NOFILE": (max_open_files, max_open_files),
        "RLIMIT_CORE": (0, 0),
    }
    use_pids_cgroup = "pids" in cgroups and cgroup_base("pids") is not None
    # RLIMIT_NPROC does not bind a process whose real user is root (even inside a user
    # namespace): the pids cgroup limits instead. Otherwise, inside the user namespace it
    # counts the sandbox's processes only; outside, every process of the user, so there it
    # applies only when asked for.
    if (
        "pids" in cgroups
        and not use_pids_cgroup
        and os.getuid() != 0
        and (namespaces or max_processes is not None)
    ):
        nproc = cgroups["pids"]
        limits["RLIMIT_NPROC"] = (nproc, nproc)

    if not _STALE_ROOTS_CHECKED:
        _STALE_ROOTS_CHECKED.append(True)
        _remove_stale(tempfile.gettempdir(), _rmtree)
    root = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")
    # io/ holds the program, the staged files and the captured streams (the program may read
    # them); work/ is its working directory (a tmpfs inside the namespaces).
    io_dir, work_dir, staged = (os.path.join(root, d) for d in ("io", "work", "io/files"))
    for d in (io_dir, work_dir, staged):
        os.mkdir(d)
    t0 = time.monotonic()
    made: dict[str, str] = {}
    status_r = status_w = -1
    try:
        for controller, limit in cgroups.items():
            path = _make_cgroup(controller, limit)
            if path is not None:
                made[controller] = path
        script = os.path.join(io_dir, "main.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(source)
        for name, content in (files or {}).items():
            target = os.path.normpath(os.path.join(staged, name))
            if not target.startswith(staged + os.sep):
                raise ValueError(f"file name {name!r} escapes the working directory")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(content if isinstance(content, bytes) else content.encode("utf-8"))
        stdin_path, out_path, err_path = (
            os.path.join(io_dir, n) for n in ("stdin", "stdout", "stderr")
        )
        with open(stdin_path, "w", encoding="utf-8") as f:
            f.write(stdin)
        status_r, status_w = os.pipe()
        spec = json.dumps(
            {
                "status_fd": status_w,
                "parent_pid": os.getpid(),
                "limits": limits,
                "python": python,
                "flags": ["-I"] if site_packages else ["-I", "-S"],
                "root": root,
                "work": work_dir,
                "staged": staged,
                "cgroups": list(made.values()),
                "namespaces": namespaces,
                "disk_mb": int(disk_mb),
                "seccomp": seccomp,
                "landlock_abi": landlock,
                "readable": _readable(python, site_packages, [io_dir, *readable]),
            }
        )
        cmd = [sys.executable, "-I", "-S", str(_DRIVER), spec, script, *(args or [])]

        # Files rather than pipes for the streams: no reader threads, no pipe deadlock, and
        # RLIMIT_FSIZE bounds how much a chatty program can make the harness hold.
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
                    pass_fds=(status_w,),
                )
            except OSError as e:
                return ExecResult(
                    "sandbox_error",
                    "",
                    f"could not start the sandbox: {e}",
                    None,
                    time.monotonic() - t0,
                )
            os.close(status_w)
            status_w = -1
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
        records = _read_status(status_r)
        ready = next((r["ready"] for r in records if isinstance(r.get("ready"), dict)), None)
        error = next((str(r["error"]) for r in records if "error" in r), None)
        if ready is None or error is not None:
            why = error or (
                f"the sandbox did not start the program within {timeout_s} s"
                if we_killed
                else f"the sandbox's bootstrap ended with status {proc.returncode} before the program "
                f"started: {stderr[-500:]}"
            )
            return ExecResult("sandbox_error", stdout, why, proc.returncode, wall, pid=proc.pid)
        ended = next((r for r in records if "exit" in r or "signal" in r), None)
        returncode = (
            None
            if ended is None
            else (int(ended["exit"]) if "exit" in ended else -int(ended["signal"]))
        )
        status = _classify(returncode, stderr, we_killed, _oom_kills(made.get("memory")) > 0)
        abi = int(ready.get("landlock_abi", 0))
        return ExecResult(
            status,
            stdout,
            stderr,
            returncode,
            wall,
            network_isolated=namespaces,
            truncated=t_out or t_err,
            pid=proc.pid,
            writes_confined=abi >= 1,
            signals_confined=abi >= 6,
            processes_limited="pids" in made or "RLIMIT_NPROC" in limits,
            reads_confined=abi >= 1,
            unix_sockets_blocked=bool(ready.get("seccomp")),
            memory_limited="memory" in made,
            disk_limited=namespaces,
            tree_contained=namespaces,
        )
    finally:
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        for path in made.values():
            _remove_cgroup(path)
        _rmtree(root)
