"""The sandbox (limits, wall-clock kill of the process group, clean env, temp dir, network)
and the code graders built on it (stdin/stdout, functional, HumanEval+)."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import sys
import time
import uuid
from pathlib import Path

import pytest

from disa import sandbox
from disa.sandbox import SandboxUnavailable, network_isolation_available, run_program
from disa.tasks.code_reward import (
    extract_code,
    grade_functional,
    grade_humaneval,
    grade_many,
    grade_stdio,
    outputs_equal,
    values_equal,
)


def _gone_or_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _marked() -> tuple[str, dict[str, str]]:
    """A mark for the environment of a sandboxed run: every process of the run (bootstrap,
    program, children, ``setsid`` or not) carries it, so it can be found from outside its
    pid namespace."""
    mark = uuid.uuid4().hex
    return mark, {"DISA_TEST_MARK": mark}


def _live_marked(mark: str) -> list[int]:
    """Host pids of the live (not zombie) processes whose environment carries ``mark``."""
    needle = f"DISA_TEST_MARK={mark}".encode()
    live = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if needle in env and not _gone_or_zombie(int(d)):
            live.append(int(d))
    return live


def _all_gone(mark: str, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while _live_marked(mark):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -- sandbox -------------------------------------------------------------------------------
def test_ok_program_with_stdin():
    r = run_program("import sys\nprint(sum(map(int, sys.stdin.read().split())))", stdin="2 3 4")
    assert r.status == "ok" and r.ok
    assert r.stdout.strip() == "9" and r.returncode == 0
    assert r.wall_s < 5


def test_error_program():
    r = run_program("raise ValueError('nope')")
    assert r.status == "error" and r.returncode == 1
    assert "ValueError: nope" in r.stderr


def test_infinite_loop_killed_with_its_process_group():
    src = (
        "import os, sys, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    while True: time.sleep(0.1)\n"
        "print('forked', flush=True)\n"
        "while True: pass\n"
    )
    mark, env = _marked()
    t0 = time.monotonic()
    r = run_program(src, timeout_s=1.0, env=env)
    assert r.status == "timeout" and r.stdout.strip() == "forked"
    assert time.monotonic() - t0 < 5
    # Every process of the run (the program and the child it forked) is dead.
    assert _all_gone(mark), "sandboxed processes survived the kill"


def test_background_child_killed_after_normal_exit():
    src = (
        "import os, time\nif os.fork() == 0:\n    time.sleep(60)\n    os._exit(0)\nprint('done')\n"
    )
    mark, env = _marked()
    r = run_program(src, env=env)
    assert r.status == "ok" and r.stdout.strip() == "done"
    assert _all_gone(mark)


def test_cpu_limit():
    r = run_program("while True: pass", timeout_s=20, cpu_s=1)
    assert r.status == "timeout"
    assert r.returncode == -signal.SIGXCPU
    assert r.wall_s < 10


def test_memory_bomb_limited():
    r = run_program("x = bytearray(4 * 1024**3)\nprint('allocated')", memory_mb=256)
    assert r.status == "memory"
    assert "allocated" not in r.stdout
    r = run_program("xs = []\nwhile True: xs.append(' ' * 10**6)", memory_mb=256, timeout_s=10)
    assert r.status == "memory"


def test_file_size_limit():
    r = run_program("open('big', 'wb').write(b'x' * (3 * 1024 * 1024))", file_size_mb=1)
    assert r.status == "file_size"


def test_output_capped():
    r = run_program("print('y' * 5_000_000)", max_output_bytes=1000)
    assert r.truncated and len(r.stdout) == 1000


def test_env_is_clean_and_tmpdir_removed(monkeypatch):
    monkeypatch.setenv("DISA_TEST_SECRET", "hunter2")
    src = "import os, json\nprint(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd()}))"
    r = run_program(src, env={"EXTRA": "1"})
    out = json.loads(r.stdout)
    assert "DISA_TEST_SECRET" not in out["env"]
    assert "hunter2" not in r.stdout
    assert out["env"]["EXTRA"] == "1"
    assert out["env"]["HOME"] == out["cwd"]
    assert not Path(out["cwd"]).exists()  # the temporary working directory is gone


def test_files_and_no_site_packages():
    r = run_program("print(open('data.txt').read())", files={"data.txt": "hello"})
    assert r.stdout.strip() == "hello"
    r = run_program("import pandas")
    assert r.status == "error" and "ModuleNotFoundError" in r.stderr
    with pytest.raises(ValueError, match="escapes"):
        run_program("pass", files={"../x": "no"})


def test_network_isolation_reported():
    # A listener on the host's loopback: reachable without isolation, not from a fresh
    # network namespace (whose loopback is down).
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    try:
        src = (
            "import socket\n"
            f"try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "    print('connected')\n"
            "except OSError as e:\n    print('blocked', e)\n"
        )
        r = run_program(src)
    finally:
        srv.close()
    assert r.network_isolated == network_isolation_available()
    if r.network_isolated:
        assert r.stdout.startswith("blocked")
    else:
        assert r.stdout.startswith("connected")


def test_without_namespaces(monkeypatch):
    monkeypatch.setattr(sandbox, "_NAMESPACES", [False])
    r = run_program("print(1)")
    assert (
        r.ok
        and r.network_isolated is False
        and r.tree_contained is False
        and r.disk_limited is False
    )
    with pytest.raises(SandboxUnavailable, match="network_isolated"):
        run_program("print(1)", require_network_isolation=True)
    with pytest.raises(SandboxUnavailable, match="tree_contained"):
        run_program("print(1)", require=["tree_contained", "writes_confined"])
    with pytest.raises(ValueError, match="allowed"):
        run_program("print(1)", require=["no_such_guard"])


# -- code extraction and comparison ----------------------------------------------------------
def test_extract_code():
    text = "Plan.\n```python\nprint(1)\n```\nBetter:\n```python\nprint(2)\n```\n```text\nx\n```"
    assert extract_code(text) == "print(2)"
    assert extract_code("```\nprint(3)\n```") == "print(3)"
    assert extract_code("print(4)\n") == "print(4)"
    assert extract_code("```py\nprint(5)") == "print(5)"  # truncated, unclosed fence


def test_output_comparison():
    assert outputs_equal("  1  2 \n3\n\n", "1 2\n3") and outputs_equal(
        "  1  2 \n3\n\n", "1 2\n3", "lines"
    )
    assert outputs_equal("yes\nNo", "YES\nNO") and not outputs_equal("yes\nNo", "YES\nNO", "lines")
    assert outputs_equal("0.3333333", "0.333333333") and not outputs_equal(
        "0.3333333", "0.333333333", "lines"
    )
    assert values_equal((1, 2), [1, 2]) and not values_equal(0.30000000000000004, 0.3)


# -- stdin/stdout and functional tests ------------------------------------------------------
ADD_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "10   20", "output": " 30 "}]


def test_grade_stdio():
    good = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    g = grade_stdio(good, ADD_TESTS)
    assert (g.passed, g.total, g.all_passed, g.pass_fraction) == (2, 2, True, 1.0)
    g = grade_stdio("print(3)", ADD_TESTS)
    assert g.statuses == ["passed", "wrong"] and g.pass_fraction == 0.5 and not g.all_passed
    g = grade_stdio("while True: pass", ADD_TESTS[:1], timeout_s=0.5)
    assert g.statuses == ["timeout"] and g.pass_fraction == 0.0
    g = grade_stdio("print(0)", ADD_TESTS, stop_on_failure=True)
    assert g.statuses == ["wrong", "not_run"]
    g = grade_stdio("", ADD_TESTS)
    assert g.pass_fraction == 0.0 and g.error is None


def test_grade_functional():
    tests = [
        {"input": "[2, 7, 11, 15]\n9", "output": "[0, 1]"},  # LiveCodeBench text form
        {"input": [[3, 2, 4], 6], "output": [1, 2]},
    ]
    sol = (
        "class Solution:\n    def twoSum(self, nums, target):\n"
        "        seen = {}\n"
        "        for i, x in enumerate(nums):\n"
        "            if target - x in seen:\n"
        "                return (seen[target - x], i)\n"  # a tuple vs the JSON list
        "            seen[x] = i\n"
    )
    g = grade_functional(sol, "twoSum", tests)
    assert g.all_passed, g
    g = grade_functional("def twoSum(nums, target):\n    return [0, 1]", "twoSum", tests)
    assert g.statuses == ["passed", "wrong"]
    g = grade_functional("def other(): pass", "twoSum", tests)
    assert g.passed == 0 and g.statuses[0] == "load_missing"
    g = grade_functional(
        "def twoSum(n, t):\n    while True: pass", "twoSum", tests[:1], timeout_s=0.5
    )
    assert g.statuses == ["timeout"]
    # A program cannot report its own success: only return values leave the sandbox.
    cheat = (
        "import sys\nprint('passed' * 100)\ndef twoSum(n, t):\n    print('[0, 1]')\n    return None"
    )
    assert grade_functional(cheat, "twoSum", tests).passed == 0


# -- hostile programs ------------------------------------------------------------------------
needs_landlock = pytest.mark.skipif(sandbox.landlock_abi() < 1, reason="no Landlock in this kernel")
needs_signal_scope = pytest.mark.skipif(
    sandbox.landlock_abi() < 6, reason="Landlock ABI < 6: no signal scoping"
)


@needs_landlock
def test_writes_outside_the_working_directory_refused(tmp_path):
    target = tmp_path / "escaped"
    for src in (
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nos.mkdir({str(target)!r})",
        f"import os\nos.symlink('/etc', {str(target)!r})",
    ):
        r = run_program(src)
        assert r.status == "error" and "PermissionError" in r.stderr and r.writes_confined, src
        assert not target.exists()
    # inside its working directory a program still creates, renames and removes files
    r = run_program(
        "import os\nopen('f', 'w').write('x')\nos.mkdir('d')\nos.rename('f', 'd/g')\n"
        "print(open('d/g').read())\nos.remove('d/g')\nos.rmdir('d')\nopen(os.devnull, 'w').write('ok')"
    )
    assert r.ok and r.stdout.strip() == "x", r.stderr


@needs_signal_scope
def test_program_cannot_signal_the_harness():
    for src in (
        "os.kill(os.getppid(), signal.SIGKILL)",
        f"os.kill({os.getpid()}, signal.SIGTERM)",
        f"os.killpg({os.getpgid(0)}, signal.SIGKILL)",
    ):
        r = run_program("import os, signal\n" + src + "\nprint('sent')")
        assert r.status == "error" and r.signals_confined, src
        # outside its pid namespace the harness is out of sight, or out of reach
        assert "PermissionError" in r.stderr or "ProcessLookupError" in r.stderr, (src, r.stderr)
    # this test process (the harness) is alive: the assertions above ran after each attempt


_FORK_LOOP = (
    "import os, time\nn = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n"
    "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(5)\n        os._exit(0)\n"
    "    n += 1\nprint(n, flush=True)\n"
)
needs_process_limit = pytest.mark.skipif(
    sandbox.pids_cgroup_base() is None
    and not (network_isolation_available() and os.geteuid() != 0),
    reason="neither a pids cgroup nor RLIMIT_NPROC in a user namespace is available",
)


@needs_process_limit
def test_process_count_limited_and_nothing_left_behind():
    """At most ``max_processes`` processes at once (the program and 7 children); every one is
    gone afterwards, including a child that left the process group with ``setsid``."""
    r = run_program(_FORK_LOOP, max_processes=8, timeout_s=10)
    assert r.ok and r.stdout.strip() == "7" and r.processes_limited
    escapee = (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    print('escaped', flush=True)\n"
        "    time.sleep(60)\ntime.sleep(1)\n"
    )
    mark, env = _marked()
    r = run_program(escapee, timeout_s=5, env=env)
    assert "escaped" in r.stdout
    if r.tree_contained or sandbox.pids_cgroup_base() is not None:
        # the pid namespace (or the cgroup) catches what the process group does not
        assert _all_gone(mark), "a setsid child outlived its sandbox"
        if sandbox.pids_cgroup_base() is not None:
            assert not [
                p
                for p in os.listdir(sandbox.pids_cgroup_base())
                if p.startswith(f"disa-sandbox-{os.getpid()}-")
            ]
    else:
        for pid in _live_marked(mark):
            os.kill(pid, signal.SIGKILL)


@needs_process_limit
def test_fork_bomb_contained():
    mark, env = _marked()
    t0 = time.monotonic()
    r = run_program(
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        timeout_s=2,
        env=env,
    )
    assert r.status == "timeout" and r.processes_limited
    assert time.monotonic() - t0 < 15
    assert _all_gone(mark), _live_marked(mark)


def test_hostile_programs_score_zero_with_the_reason(repo):
    """The grading report's hostile programs through the stdin/stdout grader: each scores 0,
    with the status expected of it, and writes nothing outside its sandbox; those whose guard
    this machine lacks are reported as not run."""
    sys.path.insert(0, str(repo / "experiments"))
    import grading_report

    rows = grading_report.containment(timeout_s=2.0)
    assert [r["program"] for r in rows] == [h.name for h in grading_report.HOSTILE]
    have = grading_report.guards()
    for r, h in zip(rows, grading_report.HOSTILE):
        assert r["reward"] == 0.0 and not r["escaped_file"], r
        assert r["status"] == (h.status if not h.needs or have[h.needs] else "skipped"), r
        assert r["reason"], r


# -- HumanEval+ ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def he_tasks() -> dict[str, dict]:
    env = os.environ.get("DISA_BENCHMARKS")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
    path = root / "code" / "humanevalplus_mini.jsonl.gz"
    if not path.is_file():
        pytest.skip("local HumanEval+ copy not present (set DISA_BENCHMARKS)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return {t["task_id"]: t for t in map(json.loads, f)}


HE_IDS = ["HumanEval/0", "HumanEval/2", "HumanEval/12", "HumanEval/32", "HumanEval/53"]


def test_humaneval_canonical_passes_wrong_fails(he_tasks):
    tasks = [he_tasks[i] for i in HE_IDS]
    grades = grade_many(tasks, [t["canonical_solution"] for t in tasks], workers=2)
    for t, g in zip(tasks, grades):
        assert g.all_passed, (t["task_id"], g)
        assert g.total == len(t["base_input"]) + len(t["plus_input"])
    wrong = [f"```python\ndef {t['entry_point']}(*args):\n    return None\n```" for t in tasks]
    for g in grade_many(tasks, wrong, workers=2):
        assert not g.all_passed and g.error is None and g.pass_fraction < 1.0


def test_humaneval_completion_forms(he_tasks):
    t = he_tasks["HumanEval/53"]  # add(x, y)
    full = "Here you go:\n```python\ndef add(x: int, y: int):\n    return x + y\n```"
    assert grade_humaneval(t, full).all_passed
    assert grade_humaneval(t, "    return x + y\n").all_passed  # body continuing the prompt
    assert grade_humaneval(t, "    return x - y\n").pass_fraction < 0.5
    base = grade_humaneval(t, full, use_plus=False)
    assert base.total == len(t["base_input"])


def test_humaneval_find_zero_accepts_any_root(he_tasks):
    t = he_tasks["HumanEval/32"]
    # Newton's method from another start point: a root, not necessarily the canonical one.
    newton = (
        "def find_zero(xs):\n"
        "    x = 3.0\n"
        "    for _ in range(2000):\n"
        "        f = poly(xs, x)\n"
        "        d = sum(i * c * x ** (i - 1) for i, c in enumerate(xs) if i)\n"
        "        if d == 0:\n            x += 0.5\n            continue\n"
        "        x -= f / d\n"
        "    return x\n"
    )
    assert grade_humaneval(t, newton).pass_fraction > 0.9


def test_grade_many_mixed_kinds(he_tasks):
    problems = [
        {"tests": ADD_TESTS},
        {
            "tests": [
                {
                    "input": "1\n2",
                    "output": "3",
                    "testtype": "functional",
                    "metadata": {"func_name": "add"},
                }
            ]
        },
        he_tasks["HumanEval/53"],
    ]
    comps = [
        "a, b = map(int, input().split())\nprint(a + b)",
        "def add(a, b):\n    return a + b",
        "    return x + y\n",
    ]
    grades = grade_many(problems, comps, workers=2)
    assert [g.all_passed for g in grades] == [True, True, True]
    with pytest.raises(ValueError, match="problems"):
        grade_many(problems, comps[:1])


def test_every_humaneval_canonical_solution_passes(he_tasks):
    """Every task of the local HumanEval+ copy: its canonical solution passes all its base
    and plus inputs (expected outputs come from the canonical solution, run in the sandbox)."""
    tasks = list(he_tasks.values())
    grades = grade_many(tasks, [t["canonical_solution"] for t in tasks], workers=2)
    failed = [
        (t["task_id"], g.statuses[:3], g.detail[:200])
        for t, g in zip(tasks, grades)
        if not g.all_passed
    ]
    assert not failed
    assert sum(g.total for g in grades) == sum(
        len(t["base_input"]) + len(t["plus_input"]) for t in tasks
    )


@pytest.mark.skipif(sandbox.pids_cgroup_base() is None, reason="no pids cgroup can be created here")
def test_stale_cgroups_of_a_killed_harness_are_removed():
    """A cgroup named after a harness process that no longer exists (killed mid-run) is
    removed at the next detection; one of a live process is kept."""
    base = sandbox.pids_cgroup_base()
    dead = 2**22 + 12345  # above pid_max: no such process
    stale = os.path.join(base, f"disa-sandbox-{dead}-abc")
    live = os.path.join(base, f"disa-sandbox-{os.getppid()}-abc")
    os.mkdir(stale)
    os.mkdir(live)
    try:
        sandbox._remove_stale_cgroups(base)
        assert not os.path.exists(stale) and os.path.exists(live)
    finally:
        for p in (stale, live):
            if os.path.exists(p):
                os.rmdir(p)
