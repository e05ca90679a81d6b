"""Grading figures of the real-benchmark tasks, printed as tables and written as JSON.

    python experiments/grading_report.py                      # benchmarks under ../shared/benchmarks
    python experiments/grading_report.py --root /data/benchmarks --out report.json

Three sections, each over the local benchmark files:

- ``math``: per benchmark, every gold answer graded against a completion that boxes it
  (must be correct: the grader agrees with the dataset about its own answers), and wrong
  answers that must be graded wrong: for a numeric gold the number plus one, for any gold
  the gold of the next item when the two differ as text (two items can share a value
  written differently, so this second rate may fall short of 1 for a right reason; the
  disagreements are listed);
- ``code``: every HumanEval+ canonical solution on its base and plus inputs (expected
  outputs come from running the canonical solution itself, so a failure means a grader or
  sandbox problem, or a nondeterministic task);
- ``sandbox``: hostile programs (:data:`HOSTILE`), each run as a graded code completion: it
  must score 0 with the reason recorded, leave nothing behind and leave the harness alive.
  A program whose guard the machine lacks (Landlock for writes and signals, a pids cgroup
  or a user namespace for processes, a network namespace) is reported, not run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from disa.tasks.benchmarks import CODE_BENCHMARKS, MATH_BENCHMARKS, benchmark_root, load_benchmark  # noqa: E402

_NUMBER = re.compile(r"^[+-]?\d+(\.\d+)?$")


# -- math ----------------------------------------------------------------------------------
def wrong_answers(golds: list[str]) -> tuple[list[int], list[str], list[int], list[str]]:
    """Two wrong-answer sets: ``(index, gold + 1)`` for numeric golds, and ``(index, next
    item's gold)`` wherever the two golds differ as text."""
    num_idx, num_wrong, other_idx, other_wrong = [], [], [], []
    for i, g in enumerate(golds):
        if _NUMBER.match(g.strip()):
            x = float(g) + 1
            num_idx.append(i)
            num_wrong.append(str(int(x)) if x.is_integer() else repr(x))
        nxt = golds[(i + 1) % len(golds)]
        if nxt.strip() != g.strip():
            other_idx.append(i)
            other_wrong.append(nxt)
    return num_idx, num_wrong, other_idx, other_wrong


def math_agreement(root: Path, names: list[str], workers: int, limit: int | None = None) -> dict[str, Any]:
    """Per benchmark: share of golds graded correct against themselves (strict and lenient
    completions) and share of wrong answers graded wrong; ``None`` grades (timeouts) counted."""
    from disa.tasks.math_reward import grade

    out: dict[str, Any] = {}
    for name in names:
        spec = MATH_BENCHMARKS[name]
        if not (root / spec.path).exists():
            out[name] = {"skipped": f"{root / spec.path} not found"}
            continue
        df = load_benchmark(spec, root, limit=limit)
        golds = [str(g) for g in df.gold]
        t0 = time.perf_counter()
        boxed = grade(golds, [f"The final answer is \\boxed{{{g}}}." for g in golds], mode="strict", workers=workers)
        marked = grade(golds, [f"Reasoning...\nAnswer: {g}" for g in golds], mode="strict", workers=workers)
        n_idx, n_wrong, o_idx, o_wrong = wrong_answers(golds)
        num = grade([golds[i] for i in n_idx], [f"\\boxed{{{w}}}" for w in n_wrong], mode="strict", workers=workers)
        other = grade([golds[i] for i in o_idx], [f"\\boxed{{{w}}}" for w in o_wrong], mode="strict", workers=workers)
        wall = time.perf_counter() - t0

        def rate(grades: list[float | None], want: float) -> dict[str, Any]:
            done = [g for g in grades if g is not None]
            return {"n": len(grades), "agree": sum(g == want for g in done), "missing": len(grades) - len(done),
                    "rate": (sum(g == want for g in done) / len(grades)) if grades else None}

        ids = df.prompt_id.tolist()
        out[name] = {
            "items": len(golds),
            "self_boxed": rate(boxed, 1.0) | {"failed_ids": [ids[i] for i, g in enumerate(boxed) if g != 1.0]},
            "self_answer_line": rate(marked, 1.0) | {"failed_ids": [ids[i] for i, g in enumerate(marked) if g != 1.0]},
            "wrong_numeric": rate(num, 0.0) | {"failed_ids": [ids[n_idx[j]] for j, g in enumerate(num) if g != 0.0]},
            "wrong_other_item": rate(other, 0.0) | {
                "equal_pairs": [(golds[o_idx[j]], o_wrong[j]) for j, g in enumerate(other) if g == 1.0][:10]},
            "wall_s": round(wall, 2),
        }
    return out


# -- code ----------------------------------------------------------------------------------
def canonical_pass_rate(root: Path, workers: int | None = None) -> dict[str, Any]:
    """Every HumanEval+ canonical solution graded on its base + plus inputs."""
    from disa.tasks.code_reward import grade_many

    spec = CODE_BENCHMARKS["humanevalplus"]
    if not (root / spec.path).exists():
        return {"skipped": f"{root / spec.path} not found"}
    df = load_benchmark(spec, root)
    t0 = time.perf_counter()
    grades = grade_many(df, df.canonical_solution.tolist(), workers=workers)
    failed = [(pid, g.to_dict()) for pid, g in zip(df.prompt_id, grades) if not g.all_passed]
    return {"tasks": len(df), "passed": len(df) - len(failed), "rate": (len(df) - len(failed)) / len(df),
            "tests": int(sum(g.total for g in grades)), "failed": failed[:10],
            "wall_s": round(time.perf_counter() - t0, 2)}


# -- sandbox ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hostile:
    """A program that misbehaves on purpose, and what the sandbox must record for it.

    ``source`` is the body of ``solve(x)``, whose correct result is ``x``; its placeholders:
    ``{marker}`` (a path outside the sandbox that must not appear), ``{secret}`` (a file
    outside the sandbox holding the expected answer, as a benchmark file or a reference
    solution would), ``{socket}`` (a listening Unix socket, as a local daemon's), ``{home}``
    and ``{project}`` (the harness user's home and this repository's README)."""

    name: str
    source: str
    status: str  # the grader's status for it
    needs: str = ""  # the guard (disa.sandbox.GUARDS) without which running it would do harm
    grader: str = "stdio"  # "stdio": reads x from stdin; "functional": solve(x) is called by the driver

    def program(self, places: dict[str, str]) -> str:
        body = self.source
        for key, value in places.items():  # not str.format: sources hold braces of their own
            body = body.replace("{" + key + "}", repr(value))
        fn = "def solve(x):\n" + "".join(f"    {line}\n" for line in body.splitlines())
        return fn if self.grader == "functional" else fn + "\nimport sys\nprint(solve(sys.stdin.read().strip()))\n"


_FORGE = "import __main__\n__main__._out.write(__main__.NONCE + {line!r} + '\\n')\n__main__._out.flush()\nreturn x"
_SPLIT = ("import os, time\nkids = []\nfor _ in range(3):\n    pid = os.fork()\n    if pid == 0:\n"
          "        b = bytearray(300 * 1024 * 1024)\n        time.sleep(0.5)\n        os._exit(0)\n    kids.append(pid)\n"
          "for k in kids:\n    os.waitpid(k, 0)\nreturn x")

#: The hostile programs, each a candidate solution of a problem whose correct answer echoes
#: the input; none may score.
HOSTILE: tuple[Hostile, ...] = (
    Hostile("infinite_loop", "while True:\n    pass", "timeout"),
    Hostile("fork_bomb", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
            "timeout", needs="processes_limited"),
    Hostile("memory_hog", "xs = []\nwhile True:\n    xs.append(bytearray(50 * 1024 * 1024))", "memory"),
    Hostile("memory_split_over_children", _SPLIT, "memory", needs="memory_limited"),
    Hostile("fill_the_disk", "for i in range(40):\n    open(f'f{i}', 'wb').write(b'x' * 4 * 1024 * 1024)\nreturn x",
            "error", needs="disk_limited"),
    Hostile("write_outside_tmp", "open({marker}, 'w').write('escaped')\nreturn x", "error", needs="writes_confined"),
    Hostile("read_the_expected_answer", "return open({secret}).read().strip()", "error", needs="reads_confined"),
    Hostile("read_etc_shadow", "open('/etc/shadow').read()\nreturn x", "error", needs="reads_confined"),
    Hostile("list_home", "import os\nos.listdir({home})\nreturn x", "error", needs="reads_confined"),
    Hostile("read_project_files", "open({project}).read()\nreturn x", "error", needs="reads_confined"),
    Hostile("open_socket", "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=3)\nreturn x", "error",
            needs="network_isolated"),
    Hostile("unix_socket_daemon", "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({socket})\nreturn x",
            "error", needs="unix_sockets_blocked"),
    Hostile("kill_parent", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nreturn x", "error",
            needs="signals_confined"),
    # inside the pid namespace the parent's group is the program's own: it kills itself
    Hostile("kill_parent_group", "import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)\nreturn x",
            "killed", needs="signals_confined"),
    Hostile("imitate_sandbox_failure",
            "import sys\nsys.stderr.write('unshare: unshare failed: Operation not permitted\\n')\nsys.exit(1)", "error"),
    Hostile("forge_undecodable_result", _FORGE.format(line='{"i": 0, "status": "ok", "value": {"__int__": "zz"}}'),
            "forged", grader="functional"),
    Hostile("forge_deep_result", _FORGE.format(line='{"i": 0, "status": "ok", "value": ' + "[" * 50000 + "]" * 50000 + "}"),
            "forged", grader="functional"),
    Hostile("forge_extra_result", _FORGE.format(line='{"i": 0, "status": "ok", "value": 7}'), "forged",
            grader="functional"),
)


def guards() -> dict[str, bool]:
    """Which of the sandbox's guards this machine has (:data:`disa.sandbox.GUARDS`)."""
    from disa.sandbox import available_guards

    return available_guards()


def containment(timeout_s: float = 3.0) -> list[dict[str, Any]]:
    """Run every :data:`HOSTILE` program through its grader (stdin/stdout, or the functional
    driver). Each row: the status and reward recorded, the reason, whether the harness
    survived (this process goes on) and whether a file appeared outside the sandbox. A
    program whose guard this machine lacks is not run (``status: "skipped"``) rather than
    allowed to do harm."""
    import socket

    from disa.tasks.code_reward import grade_functional, grade_stdio

    have = guards()
    rows = []
    with tempfile.TemporaryDirectory(prefix="disa-hostile-") as tmp:
        secret = Path(tmp, "expected_answer.txt")
        secret.write_text("7\n")
        daemon = socket.socket(socket.AF_UNIX)
        daemon.bind(str(Path(tmp, "daemon.sock")))
        daemon.listen(1)
        places = {"secret": str(secret), "socket": str(Path(tmp, "daemon.sock")), "home": str(Path.home()),
                  "project": str(REPO / "README.md")}
        try:
            for h in HOSTILE:
                if h.needs and not have[h.needs]:
                    rows.append({"program": h.name, "status": "skipped", "expected_status": h.status, "reward": 0.0,
                                 "reason": f"not run: this machine lacks the {h.needs} guard", "harness_alive": True,
                                 "escaped_file": False, "wall_s": 0.0})
                    continue
                marker = Path(tempfile.gettempdir()) / f"disa-escape-{uuid.uuid4().hex}"
                program = h.program({**places, "marker": str(marker)})
                t0 = time.perf_counter()
                if h.grader == "functional":
                    g = grade_functional(program, "solve", [{"input": [7], "output": 7}], timeout_s=timeout_s,
                                         memory_mb=512, extract=False)
                else:
                    g = grade_stdio(program, [{"input": "7", "output": "7"}], timeout_s=timeout_s, memory_mb=512,
                                    extract=False)
                rows.append({
                    "program": h.name, "reward": float(g.all_passed), "status": g.statuses[0] if g.statuses else g.error,
                    "expected_status": h.status, "reason": g.detail.strip().splitlines()[-1] if g.detail.strip() else "",
                    "harness_alive": True,  # this line runs in the harness process: reaching it is the check
                    "escaped_file": marker.exists(), "wall_s": round(time.perf_counter() - t0, 2),
                })
                if marker.exists():
                    marker.unlink()
        finally:
            daemon.close()
    return rows


# -- report ----------------------------------------------------------------------------------
def report(res: dict[str, Any]) -> str:
    lines = ["math: gold answers graded against themselves, and wrong answers",
             "| benchmark | items | self (boxed) | self (Answer:) | numeric+1 wrong | other item's gold wrong | missing | s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in res["math"].items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} |")
            continue

        def f(x):
            return f"{x['agree']}/{x['n']}" if x["n"] else "–"

        missing = sum(r[k]["missing"] for k in ("self_boxed", "self_answer_line", "wrong_numeric", "wrong_other_item"))
        lines.append(f"| {name} | {r['items']} | {f(r['self_boxed'])} | {f(r['self_answer_line'])} | "
                     f"{f(r['wrong_numeric'])} | {f(r['wrong_other_item'])} | {missing} | {r['wall_s']} |")
    c = res["code"]
    lines += ["", "code: HumanEval+ canonical solutions on base + plus inputs"]
    lines.append(f"skipped: {c['skipped']}" if "skipped" in c else
                 f"{c['passed']}/{c['tasks']} tasks pass ({c['tests']} tests), {c['wall_s']} s")
    lines += ["", f"sandbox: hostile programs (guards here: {res['guards']})", "| program | status | reward | reason | harness alive | file escaped | s |",
              "|---|---|---|---|---|---|---|"]
    for r in res["sandbox"]:
        lines.append(f"| {r['program']} | {r['status']} | {r['reward']:.0f} | {r['reason'][:60]} | "
                     f"{r['harness_alive']} | {r['escaped_file']} | {r['wall_s']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=None, help="benchmark root (default: $DISA_BENCHMARKS or ../shared/benchmarks)")
    p.add_argument("--benchmarks", default="aime24,aime25,amc23,math500,minerva_math,olympiadbench,gsm8k")
    p.add_argument("--limit", type=int, default=None, help="items per benchmark (default: all)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--out", default="outputs/grading/report.json")
    a = p.parse_args(argv)
    root = Path(a.root) if a.root else benchmark_root(REPO.parent / "shared" / "benchmarks")
    res = {"root": str(root), "guards": guards(), "sandbox": containment(),
           "code": canonical_pass_rate(root, a.workers),
           "math": math_agreement(root, a.benchmarks.split(","), a.workers, a.limit)}
    print(report(res))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x)))
    print(f"\nwrote {a.out}")
    return res


if __name__ == "__main__":
    main()
