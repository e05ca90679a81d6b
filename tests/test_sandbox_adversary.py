"""The sandbox against a program that wants to be graded well: it reads what it should not,
reaches local daemons, splits its memory over processes, fills the disk, outlives the
harness, imitates a sandbox failure or forges the driver's result lines. Each case runs
through the real sandbox (and, where a grader is involved, the real grader); a case whose
guard this machine lacks is skipped with the reason."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from test_sandbox import _all_gone, _live_marked, _marked

from disa import sandbox
from disa.sandbox import GUARDS, SandboxUnavailable, available_guards, run_program
from disa.tasks.code_reward import _parse_results, grade_functional, grade_many, grade_stdio

HAVE = available_guards()


def needs(guard: str):
    return pytest.mark.skipif(
        not HAVE[guard], reason=f"this machine lacks the sandbox guard {guard}"
    )


# -- reads ----------------------------------------------------------------------------------
@needs("reads_confined")
def test_reads_confined_to_the_interpreter_and_own_files(tmp_path, repo):
    secret = tmp_path / "reference_solution.py"
    secret.write_text("ANSWER = 42\n")
    bench = repo.parent / "shared" / "benchmarks"
    targets = [
        str(secret),
        "/etc/passwd",
        str(Path.home()),
        str(repo / "README.md"),
        str(repo / "disa"),
        str(bench),
        os.path.expanduser("~/.netrc"),
    ]
    for target in targets:
        src = (
            f"import os\np = {target!r}\n"
            "print(os.listdir(p) if os.path.isdir(p) else open(p, 'rb').read()[:10])"
        )
        r = run_program(src)
        assert r.status == "error" and r.reads_confined, (target, r.stdout)
        # a missing one fails for that reason; it must not be read either
        if os.path.exists(target):
            assert "PermissionError" in r.stderr, (target, r.stderr[-300:])
    # What a program needs still works: the standard library, its own files, /dev/urandom.
    r = run_program(
        "import json, decimal, fractions, heapq, re, os\nprint(open('in.txt').read(), len(os.urandom(8)))",
        files={"in.txt": "mine"},
    )
    assert r.ok and r.stdout.split() == ["mine", "8"], r.stderr
    # A path granted explicitly becomes readable (and nothing else does).
    r = run_program(f"print(open({str(secret)!r}).read().strip())", readable=[str(secret)])
    assert r.ok and r.stdout.strip() == "ANSWER = 42"


@needs("reads_confined")
def test_site_packages_readable_when_asked_the_project_never():
    r = run_program("import numpy\nprint(numpy.__name__)", site_packages=True, memory_mb=2048)
    assert r.ok and r.stdout.strip() == "numpy", r.stderr[-300:]
    # an editable install points into the project
    r = run_program("import disa", site_packages=True, memory_mb=2048)
    assert r.status == "error" and "PermissionError" in r.stderr


# -- sockets --------------------------------------------------------------------------------
@needs("unix_sockets_blocked")
def test_unix_sockets_unreachable(tmp_path):
    path = str(tmp_path / "daemon.sock")
    listeners = []
    for address in (path, "\0disa-test-" + tmp_path.name):  # a filesystem and an abstract socket
        s = socket.socket(socket.AF_UNIX)
        s.bind(address)
        s.listen(1)
        listeners.append(s)
    try:
        for address in (path, "\0disa-test-" + tmp_path.name):
            src = f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({address!r})\nprint('connected')"
            r = run_program(src)
            assert r.status == "error" and "connected" not in r.stdout, (address, r.stdout)
            assert "PermissionError" in r.stderr, r.stderr[-300:]
        # a socketpair reaches nothing outside and stays allowed
        r = run_program("import socket\na, b = socket.socketpair()\na.send(b'x')\nprint(b.recv(1))")
        assert r.ok and "b'x'" in r.stdout
    finally:
        for s in listeners:
            s.close()


# -- budgets ---------------------------------------------------------------------------------
_SPLIT = (
    "import os, time\nkids = []\nfor _ in range(3):\n    pid = os.fork()\n    if pid == 0:\n"
    "        b = bytearray({mb} * 1024 * 1024)\n        time.sleep(0.5)\n        os._exit(0)\n    kids.append(pid)\n"
    "print([os.waitpid(k, 0)[1] for k in kids])\n"
)


@needs("memory_limited")
def test_one_memory_budget_for_all_processes():
    """Three children of 300 MB each under a 512 MB budget: each fits the per-process limit,
    together they do not. The run is a memory failure even though the parent survives the
    loss of its children and exits 0."""
    r = run_program(_SPLIT.format(mb=300), memory_mb=512, timeout_s=20)
    assert r.status == "memory", (r.status, r.stdout, r.stderr[-300:])
    r = run_program(_SPLIT.format(mb=60), memory_mb=512, timeout_s=20)  # control: together they fit
    assert r.ok and r.stdout.strip() == "[0, 0, 0]", (r.status, r.stderr[-300:])


@needs("disk_limited")
def test_one_disk_budget_for_all_files():
    src = (
        "n = 0\ntry:\n    for i in range(40):\n        open(f'f{i}', 'wb').write(b'x' * 4 * 1024 * 1024)\n"
        "        n += 4\nexcept OSError as e:\n    print(n, e.errno)\n"
    )
    r = run_program(src, disk_mb=32, file_size_mb=16)
    written, err = map(int, r.stdout.split())
    assert r.ok and written <= 32 and err == 28  # ENOSPC well before the 160 MB asked for


# -- the harness dies -----------------------------------------------------------------------
@needs("tree_contained")
def test_program_dies_and_files_go_when_the_harness_is_killed(tmp_path):
    """SIGKILL the harness mid-run: the program, its children (one ``setsid``-ed) and the
    run's directory are gone within seconds, without waiting for another harness."""
    mark, env = _marked()
    program = (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(120)\n"
        "open('big', 'wb').write(b'x' * 1000)\nprint('started', flush=True)\ntime.sleep(120)\n"
    )
    harness = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys\nfrom disa.sandbox import run_program\n"
                f"run_program({program!r}, timeout_s=300, env={env!r})\n"
            ),
        ],
        cwd=Path(__file__).parents[1],
    )
    try:
        deadline = time.monotonic() + 30
        while len(_live_marked(mark)) < 4:  # outer, init, the program, its child
            assert time.monotonic() < deadline and harness.poll() is None, (
                "the sandbox did not start"
            )
            time.sleep(0.05)
        roots = list(Path(tempfile.gettempdir()).glob(f"disa-sandbox-{harness.pid}-*"))
        assert roots
        harness.kill()
        harness.wait()
        assert _all_gone(mark, within_s=10), _live_marked(mark)
        deadline = time.monotonic() + 10
        while any(r.exists() for r in roots):
            assert time.monotonic() < deadline, "the run's directory outlived the harness"
            time.sleep(0.05)
    finally:
        harness.kill()
        for pid in _live_marked(mark):
            os.kill(pid, signal.SIGKILL)


def test_stale_run_directories_of_a_killed_harness_are_removed(tmp_path):
    dead = 2**22 + 12345  # above pid_max: no such process
    stale = tmp_path / f"disa-sandbox-{dead}-abc"
    live = tmp_path / f"disa-sandbox-{os.getppid()}-abc"
    for d in (stale, live):
        (d / "io").mkdir(parents=True)
    sandbox._remove_stale(str(tmp_path), sandbox._rmtree)
    assert not stale.exists() and live.exists()


# -- a failure of the program is never a failure of the sandbox, nor the reverse ------------
@pytest.mark.parametrize(
    "imitation",
    [
        "sys.stderr.write('unshare: unshare failed: Operation not permitted\\n')\nsys.exit(1)",
        "sys.stderr.write('sandbox: could not join the pids cgroup: denied\\n')\nsys.exit(121)",
        'os.write(3, b\'{"error": "forged"}\\n\')\nos.write(4, b\'{"error": "forged"}\\n\')\nsys.exit(121)',
    ],
)
def test_imitated_sandbox_failure_is_the_program_failing(imitation):
    r = run_program("import os, sys\n" + imitation)
    assert r.status == "error" and r.returncode in (1, 121), (r.status, r.stderr[-300:])
    g = grade_stdio("import os, sys\n" + imitation, [{"input": "", "output": ""}], extract=False)
    assert g.error is None and g.pass_fraction == 0.0 and g.statuses == ["error"]


def test_a_real_sandbox_failure_is_reported_as_one():
    r = run_program("print(1)", python="/nonexistent/python3")
    assert r.status == "sandbox_error" and "/nonexistent/python3" in r.stderr
    g = grade_stdio("print(1)", [{"input": "", "output": "1"}], extract=False)
    assert g.all_passed  # the control: the same program with a working interpreter


# -- forged driver output ---------------------------------------------------------------------
_FORGE = (
    "def add(a, b):\n"
    "    import __main__\n"
    "    __main__._out.write(__main__.NONCE + {payload!r} + '\\n')\n"
    "    __main__._out.flush()\n"
    "    return a + b\n"
)
_FORGED_PAYLOADS = {
    "index not an int": '{"i": "0", "status": "ok", "value": 3}',
    "bad int encoding": '{"i": 0, "status": "ok", "value": {"__int__": "zz"}}',
    "dict pairs not pairs": '{"i": 0, "status": "ok", "value": {"__dict__": [[1]]}}',
    "missing status": '{"i": 0, "value": 3}',
    "deep nesting": '{"i": 0, "status": "ok", "value": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "not an object": "[1, 2]",
    "undecodable": '{"i": 0, "status": "ok", "value": 3',
    "second load record": '{"load": "ok"}',
    "duplicate result": '{"i": 0, "status": "ok", "value": 3}',
}


@pytest.mark.parametrize("payload", list(_FORGED_PAYLOADS.values()), ids=list(_FORGED_PAYLOADS))
def test_forged_driver_output_fails_every_test_and_never_crashes(payload):
    tests = [{"input": [1, 2], "output": 3}, {"input": [5, 5], "output": 10}]
    g = grade_functional(_FORGE.format(payload=payload), "add", tests, extract=False)
    assert g.error is None and g.pass_fraction == 0.0 and g.statuses == ["forged", "forged"], g
    assert "forged" in g.detail
    # the control: the same function without the forgery passes
    assert grade_functional(
        "def add(a, b):\n    return a + b\n", "add", tests, extract=False
    ).all_passed


def test_result_parser_against_hand_made_streams():
    n = "N0NCE"
    ok = [
        n + json.dumps({"load": "ok"}),
        n + json.dumps({"i": 0, "status": "ok", "value": {"__tuple__": [1, 2]}}),
        n + json.dumps({"i": 1, "status": "timeout"}),
    ]
    assert _parse_results("\n".join(ok), n, 2, False)[:4] == (
        "ok",
        ["ok", "timeout"],
        [(1, 2), None],
        "timeout",
    )
    # lines without the nonce are the program's own and ignored; a line cut by the output cap
    # ends the results when the output was truncated, and is a forgery when it was not
    cut = [*ok[:2], "noise", n + '{"i": 1, "sta']
    assert _parse_results("\n".join(cut), n, 2, True)[:2] == ("ok", ["ok", "not_run"])
    assert _parse_results("\n".join(cut), n, 2, False)[:2] == ("forged", ["forged", "forged"])
    # a result before the load record, out of order, or past the last input
    for bad in (
        [ok[1], ok[0]],
        [ok[0], ok[2], ok[1]],
        [*ok, n + json.dumps({"i": 2, "status": "ok", "value": 1})],
    ):
        assert _parse_results("\n".join(bad), n, 2, False)[0] == "forged"


# -- guards reach the result -----------------------------------------------------------------
def test_guard_flags_reach_the_code_grade():
    g = grade_stdio("print(input())", [{"input": "7", "output": "7"}], extract=False)
    assert g.all_passed and set(g.guards) == set(GUARDS)
    assert g.guards == HAVE
    flags = {k: v for k, v in g.to_dict().items() if k.startswith("sandbox_")}
    assert flags == {f"sandbox_{k}": v for k, v in HAVE.items()}
    problems = [{"tests": [{"input": "7", "output": "7"}]}]
    assert grade_many(problems, ["print(input())"], extract=False)[0].guards == HAVE


def test_required_guards_refuse_a_machine_without_them(monkeypatch):
    monkeypatch.setattr(sandbox, "_LANDLOCK_ABI", 0)
    assert {"reads_confined", "writes_confined", "signals_confined"} <= set(
        sandbox.missing_guards()
    )
    with pytest.raises(SandboxUnavailable, match="reads_confined"):
        run_program("print(1)", require=["reads_confined"])
    r = run_program("print(1)")  # not required: runs, and says what it lacked
    assert r.ok and not r.reads_confined and not r.writes_confined


def test_guard_flags_reach_the_run_summary():
    """``{model}.sandbox.<guard>``: True only where the guard confined every program that
    ran; samples without a run (no code) do not count; no sandbox column, no entry."""
    from disa.stages.evaluate import sandbox_guards

    samples = pd.DataFrame(
        {
            "reward": [1.0, 0.0, 0.0],
            "sandbox_reads_confined": [True, True, None],
            "sandbox_memory_limited": [True, False, None],
        }
    )
    assert sandbox_guards(samples, "policy") == {
        "policy.sandbox.reads_confined": True,
        "policy.sandbox.memory_limited": False,
    }
    assert sandbox_guards(samples[["reward"]], "ref") == {}
