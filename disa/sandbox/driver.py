"""Bootstrap of a sandboxed run: runs in the child before the untrusted program.

:func:`disa.sandbox.run_program` starts it as a script, by path, under the same isolated
interpreter flags as before (``python -I -S driver.py SPEC PROGRAM [ARGS...]``), so it may
import only the standard library and never ``disa``: site-packages is off (``-S``) and
neither the script's directory nor the user site is on ``sys.path`` (``-I``).

``SPEC`` (``sys.argv[1]``) is a JSON object:

* ``limits``: ``{"RLIMIT_...": [soft, hard]}``; names this platform's :mod:`resource` lacks
  are skipped;
* ``python``, ``flags``: the interpreter, and its flags, to ``exec`` on the program;
* ``landlock_abi``: the kernel's Landlock ABI the parent detected (0 or absent: no Landlock);
* ``writable``: the directories the program may create, write, remove or rename files in;
* ``cgroup``: a per-run ``pids`` cgroup directory to join first, or null.

Why a bootstrap interpreter rather than ``subprocess``'s ``preexec_fn``: ``preexec_fn`` runs
Python code between ``fork`` and ``exec`` and is documented as unsafe when the parent has
threads, and graders call ``run_program`` from thread pools. Here the limits are set in a
fresh process, which then ``exec``-s a clean interpreter on the program so that nothing of
the bootstrap stays in its process image.

soft == hard for every limit except CPU (hard = soft + 1 s: SIGXCPU at the soft limit gives a
clear signal, SIGKILL at the hard one is the backstop). A requested value above an existing
finite hard limit is clipped to it (raising a hard limit needs privileges).

Exit status 121 (``_CONFINE_FAILED`` in the parent) with a ``sandbox: ...`` line on stderr:
the requested confinement could not be applied; the program was not run.
"""

import json
import os
import resource
import sys


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("cgroup"):  # before anything else: every process the program starts counts
        try:
            with open(spec["cgroup"] + "/cgroup.procs", "w") as f:
                f.write(str(os.getpid()))
        except OSError as e:
            sys.stderr.write("sandbox: could not join the pids cgroup: " + str(e) + "\n")
            sys.exit(121)
    for name, (soft, hard) in spec["limits"].items():
        res = getattr(resource, name, None)
        if res is None:
            continue
        cur_soft, cur_hard = resource.getrlimit(res)
        if cur_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        resource.setrlimit(res, (soft, hard))
    if spec.get("landlock_abi"):
        _landlock(spec["landlock_abi"], spec["writable"])
    os.execv(spec["python"], [spec["python"], *spec["flags"], *sys.argv[2:]])


def _landlock(abi: int, writable: list) -> None:
    """From here on, this process and its children may create, write, remove or rename
    files only beneath ``writable`` (and write /dev/null), and (ABI 6+) may not signal
    processes outside the sandbox. Reads stay allowed everywhere. Requested because the
    parent detected Landlock (its ABI is passed): failure fails closed (exit 121)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    # handled_access_fs: every filesystem right of ABI 1 but EXECUTE and READ_FILE/READ_DIR
    # (0x1FF2), plus REFER (ABI 2) and TRUNCATE (ABI 3); handled_access_net (ABI 4) stays 0;
    # scoped (ABI 6): SIGNAL (0x2). The struct is passed at the size the kernel's ABI knows.
    fs = 0x1FF2 | (0x2000 if abi >= 2 else 0) | (0x4000 if abi >= 3 else 0)
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    attr = (ctypes.c_uint64 * 3)(fs, 0, 0x2 if abi >= 6 else 0)
    # landlock_create_ruleset = 444, landlock_add_rule = 445, landlock_restrict_self = 446
    ruleset = libc.syscall(444, attr, ctypes.c_size_t(size), ctypes.c_uint32(0))

    class Beneath(ctypes.Structure):  # struct landlock_path_beneath_attr
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]

    # /dev/null: WRITE_FILE (0x2), and TRUNCATE (ABI 3+) so that open(os.devnull, "w") works
    rules = [(d, fs) for d in writable] + [("/dev/null", 0x2 | (0x4000 if abi >= 3 else 0))]
    ok = ruleset >= 0
    for path, allowed in rules:
        if ok:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            rule = ctypes.byref(Beneath(allowed, fd))
            # rule type 1: LANDLOCK_RULE_PATH_BENEATH
            ok = libc.syscall(445, ruleset, 1, rule, ctypes.c_uint32(0)) == 0
            os.close(fd)
    # prctl(PR_SET_NO_NEW_PRIVS = 38, 1): required to restrict itself without privileges
    ok = (
        ok
        and libc.prctl(38, 1, 0, 0, 0) == 0
        and libc.syscall(446, ruleset, ctypes.c_uint32(0)) == 0
    )
    if not ok:
        err = os.strerror(ctypes.get_errno())
        sys.stderr.write("sandbox: landlock confinement failed: " + err + "\n")
        sys.exit(121)


if __name__ == "__main__":
    main()
