"""Bootstrap of a sandboxed run: runs before, and around, the untrusted program.

:func:`disa.sandbox.run_program` starts it as a script, by path, under an isolated interpreter
(``python -I -S driver.py SPEC PROGRAM [ARGS...]``), so it imports only the standard library,
never ``disa``. Three processes, each trusted until the last ``exec``::

    harness ── outer ── init ── program
               (this script, forked twice; the program's interpreter is exec-ed last)

* **outer** sets a parent-death signal (the harness dies → outer cleans up and dies), joins
  the run's cgroups (``pids``, ``memory``: every later process counts against one budget),
  creates the namespaces (user, mount, network, pid) and forks init. If the harness dies,
  outer kills init (the pid namespace, and with it every process of the program, dies with
  it) and removes the run's directory.
* **init** is pid 1 of the new pid namespace: when it exits, the kernel kills whatever the
  program left running, ``setsid`` or not. It mounts a size-limited tmpfs on the working
  directory (one disk budget, gone with the namespace), copies the staged files into it,
  forks the program, reaps, and reports how the program ended.
* **program**: resource limits, a seccomp filter (no Unix-domain sockets), Landlock (reads
  confined to the interpreter, the system libraries and the run's own files; writes to the
  working directory; no signals or abstract sockets outside the sandbox; no TCP), then
  ``exec`` of a clean interpreter on the program. It runs as an unprivileged user of the
  namespace: no capabilities survive that ``exec``.

The harness learns what happened on a **status channel**: a pipe (``status_fd``) whose only
reader is the harness and whose only writers are outer, init and the program child *before*
its ``exec`` (the descriptor is close-on-exec there; init and outer are non-dumpable and
outside the program's Landlock domain, so it cannot reach theirs through ``/proc`` or
``ptrace``). One JSON object per line:

* ``{"ready": {guard: bool}}`` — the program is about to start, with these guards in force;
* ``{"exit": code}`` or ``{"signal": n}`` — how the program ended (from init);
* ``{"error": text}`` — the sandbox could not start the program, which never ran.

Nothing the program writes to stdout or stderr can imitate these.

``SPEC`` (``sys.argv[1]``) is a JSON object: ``status_fd``, ``parent_pid``; ``limits``
(``{"RLIMIT_...": [soft, hard]}``; names this platform's :mod:`resource` lacks are skipped;
a request above an existing finite hard limit is clipped to it); ``python`` and ``flags``
(the interpreter and its flags for the program); ``root`` (the run's directory, removed if
the harness dies), ``work`` (the working directory), ``staged`` (files copied into it);
``cgroups`` (directories to join); ``namespaces`` (bool); ``disk_mb`` (tmpfs size);
``seccomp`` (bool); ``landlock_abi`` (0: none); ``readable`` (paths the program may read).
A guard asked for that cannot be applied fails closed: an ``error`` record, exit 121.
"""

import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import sys

SPEC = json.loads(sys.argv[1])
STATUS_FD = SPEC["status_fd"]
#: exit status of the bootstrap when the sandbox could not be set up
CONFINE_FAILED = 121

_libc = ctypes.CDLL(None, use_errno=True)

# prctl options
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP = 1, 4, 38, 22
# unshare(2) flags; mount(2) flags
_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = (
    0x20000,
    0x10000000,
    0x20000000,
    0x40000000,
)
_MS_NOSUID, _MS_NODEV, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x4000, 0x40000
#: the program's user and group inside the user namespace: not 0, so that ``exec`` drops
#: every capability the namespace's creator held
_INNER_ID = 1000


def report(obj) -> None:
    os.write(STATUS_FD, (json.dumps(obj) + "\n").encode())


def fail(what: str) -> None:
    err = ctypes.get_errno()
    report({"error": f"{what}: {os.strerror(err) if err else 'failed'}"})
    os._exit(CONFINE_FAILED)


def _prctl(option: int, arg: int) -> bool:
    return (
        _libc.prctl(
            option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)
        )
        == 0
    )


# -- outer --------------------------------------------------------------------------------
def outer() -> None:
    _prctl(_PR_SET_DUMPABLE, 0)
    # The harness's death is a SIGTERM here, handled below; checked after setting it, in
    # case the harness died before.
    signal.signal(signal.SIGTERM, _harness_died)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != SPEC["parent_pid"]:
        _harness_died()
    for cgroup in SPEC["cgroups"]:  # first: every process from here on counts
        try:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        except OSError as e:
            report({"error": f"could not join the cgroup {cgroup}: {e}"})
            os._exit(CONFINE_FAILED)
    if SPEC["namespaces"]:
        uid, gid = os.getuid(), os.getgid()
        if _libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID) != 0:
            fail("unshare (user, mount, network and pid namespaces)")
        try:
            for name, text in (
                ("setgroups", "deny"),
                ("uid_map", f"{_INNER_ID} {uid} 1"),
                ("gid_map", f"{_INNER_ID} {gid} 1"),
            ):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        except OSError as e:
            report({"error": f"could not map the namespace's user: {e}"})
            os._exit(CONFINE_FAILED)
    global _INIT
    _INIT = os.fork()
    if _INIT == 0:
        init()
    _, status = _wait(_INIT)
    os._exit(
        os.waitstatus_to_exitcode(status) & 0xFF
        if os.WIFEXITED(status)
        else 128 + os.WTERMSIG(status)
    )


_INIT = 0


def _harness_died(*_) -> None:
    """The harness is gone: nobody will read the result or clean up. Kill the program (with
    a pid namespace, killing init kills every process in it; without, the process group's
    other members), remove the run's directory, and go."""
    if _INIT > 0:
        _kill(_INIT)
    if not SPEC["namespaces"]:
        me, group = os.getpid(), os.getpgid(0)
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != me:
                try:
                    if os.getpgid(int(entry)) == group:
                        _kill(int(entry))
                except OSError:
                    pass
    if SPEC["namespaces"]:  # outer shares init's mount namespace: detach the tmpfs first
        _libc.umount2(SPEC["work"].encode(), 2)  # MNT_DETACH
    shutil.rmtree(SPEC["root"], ignore_errors=True)
    os._exit(1)


def _kill(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


def _wait(pid: int):
    while True:
        try:
            return os.waitpid(pid, 0)
        except ChildProcessError:
            return pid, 0x7F00  # exit status 127: nothing to wait for


# -- init ---------------------------------------------------------------------------------
def init() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # outer gone → init gone → namespace gone
    work = SPEC["work"]
    if SPEC["namespaces"]:
        # Mounts made here stay here (made private first), and vanish with the namespace.
        if _libc.mount(None, b"/", None, ctypes.c_ulong(_MS_REC | _MS_PRIVATE), None) != 0:
            fail("making the mount namespace private")
        opts = f"size={int(SPEC['disk_mb'])}m,mode=0700".encode()
        if (
            _libc.mount(
                b"tmpfs", work.encode(), b"tmpfs", ctypes.c_ulong(_MS_NOSUID | _MS_NODEV), opts
            )
            != 0
        ):
            fail("mounting the working directory's tmpfs")
    try:
        shutil.copytree(SPEC["staged"], work, dirs_exist_ok=True)
        os.chdir(work)
    except OSError as e:
        report({"error": f"could not prepare the working directory: {e}"})
        os._exit(CONFINE_FAILED)
    pid = os.fork()
    if pid == 0:
        program()
    while True:  # pid 1 also reaps the orphans the program leaves
        try:
            done, status = os.wait()
        except ChildProcessError:
            report({"error": "the program's process was lost"})
            os._exit(CONFINE_FAILED)
        if done == pid:
            break
    if os.WIFSIGNALED(status):
        report({"signal": os.WTERMSIG(status)})
    else:
        report({"exit": os.waitstatus_to_exitcode(status)})
    os._exit(0)


# -- program ------------------------------------------------------------------------------
def program() -> None:
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    import resource

    for name, (soft, hard) in SPEC["limits"].items():
        res = getattr(resource, name, None)
        if res is None:
            continue
        _, cur_hard = resource.getrlimit(res)
        if cur_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        resource.setrlimit(res, (soft, hard))
    if not _prctl(_PR_SET_NO_NEW_PRIVS, 1):
        fail("prctl(PR_SET_NO_NEW_PRIVS)")
    guards = {"seccomp": bool(SPEC["seccomp"]) and _block_unix_sockets()}
    abi = int(SPEC["landlock_abi"])
    if abi:
        _landlock(abi, SPEC["work"], SPEC["readable"])
    report({"ready": {**guards, "landlock_abi": abi}})
    os.set_inheritable(STATUS_FD, False)  # gone at exec; still here to report a failed exec
    python = SPEC["python"]
    try:
        os.execv(python, [python, *SPEC["flags"], *sys.argv[2:]])
    except OSError as e:
        report({"error": f"could not start {python}: {e}"})
        os._exit(CONFINE_FAILED)


def _block_unix_sockets() -> bool:
    """A seccomp filter: ``socket(AF_UNIX, …)`` fails with EACCES, so no filesystem socket
    (a local daemon) can be reached; syscalls of a foreign ABI (i386 ``int 0x80``, x32)
    fail with EPERM so that they cannot go around it. ``socketpair`` stays allowed (it
    reaches nothing outside). False on an architecture this filter does not know."""
    arch, nr_socket = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}.get(
        os.uname().machine, (0, 0)
    )
    if not arch:
        return False
    # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, deny_unix, deny_abi = 0x7FFF0000, 0x00050000 | errno.EACCES, 0x00050000 | errno.EPERM
    # seccomp_data: nr at 0, arch at 4, args[0] (low 32 bits, little-endian) at 16.
    # A jump's offsets (true, false) count the instructions it skips.
    program = [
        (ld, 0, 0, 4),  # 0  A = arch
        (jeq, 0, 7, arch),  # 1  native ABI → 2, else → 9
        (ld, 0, 0, 0),  # 2  A = syscall number
        (jge, 5, 0, 0x40000000),  # 3  x32 → 9, else → 4
        (jeq, 0, 2, nr_socket),  # 4  socket → 5, else → 7
        (ld, 0, 0, 16),  # 5  A = domain
        (jeq, 1, 0, 1),  # 6  AF_UNIX → 8, else → 7
        (ret, 0, 0, allow),  # 7
        (ret, 0, 0, deny_unix),  # 8
        (ret, 0, 0, deny_abi),  # 9
    ]

    class Filter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_uint16),
            ("jt", ctypes.c_uint8),
            ("jf", ctypes.c_uint8),
            ("k", ctypes.c_uint32),
        ]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(program))(*[Filter(*ins) for ins in program])
    prog = Prog(len(program), filters)
    # prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 2, &prog)
    if (
        _libc.prctl(
            _PR_SET_SECCOMP,
            ctypes.c_ulong(2),
            ctypes.byref(prog),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        )
        != 0
    ):
        fail("installing the seccomp filter")
    return True


def _landlock(abi: int, work: str, readable: list) -> None:
    """From here on, this process and its children may read only ``readable`` and ``work``
    (and /dev/null), create, write, remove or rename files only beneath ``work``, and, by
    ABI: (4+) not bind or connect TCP sockets, (6+) not signal processes or connect to
    abstract Unix sockets outside the sandbox."""
    # Filesystem rights of ABI 1 but EXECUTE (0x1FFE: reads and writes), REFER (ABI 2),
    # TRUNCATE (ABI 3); network (ABI 4): BIND_TCP | CONNECT_TCP; scopes (ABI 6):
    # ABSTRACT_UNIX_SOCKET | SIGNAL. The struct is passed at the size the kernel's ABI knows.
    fs = 0x1FFE | (0x2000 if abi >= 2 else 0) | (0x4000 if abi >= 3 else 0)
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    attr = (ctypes.c_uint64 * 3)(fs, 0x3 if abi >= 4 else 0, 0x3 if abi >= 6 else 0)
    # landlock_create_ruleset = 444, landlock_add_rule = 445, landlock_restrict_self = 446
    ruleset = _libc.syscall(444, attr, ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        fail("landlock_create_ruleset")

    class Beneath(ctypes.Structure):  # struct landlock_path_beneath_attr
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]

    read_file, read_dir, write_file, truncate = 0x4, 0x8, 0x2, (0x4000 if abi >= 3 else 0)
    rules = [(work, fs), ("/dev/null", read_file | write_file | truncate)]
    for path in readable:
        if os.path.exists(path):
            rules.append((path, read_file | read_dir if os.path.isdir(path) else read_file))
    for path, allowed in rules:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = ctypes.byref(Beneath(allowed, fd))
        # rule type 1: LANDLOCK_RULE_PATH_BENEATH
        ok = _libc.syscall(445, ruleset, 1, rule, ctypes.c_uint32(0)) == 0
        os.close(fd)
        if not ok:
            fail(f"landlock_add_rule for {path}")
    if _libc.syscall(446, ruleset, ctypes.c_uint32(0)) != 0:
        fail("landlock_restrict_self")
    os.close(ruleset)


if __name__ == "__main__":
    outer()
