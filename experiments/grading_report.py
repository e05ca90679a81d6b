"""Grading figures of the real-benchmark tasks, printed as tables and written as JSON.

    python experiments/grading_report.py                      # every section, the local benchmarks
    python experiments/grading_report.py --sections code --benchmarks humanevalplus \
        '{name: humanevalplus_full, path: /data/HumanEvalPlus-OriginFmt.jsonl}' \
        '{name: codeforces, path: /data/rllm/test/code/codeforces.json}'
    python experiments/grading_report.py --root /data/benchmarks --out report.json

``--benchmarks`` takes any benchmark a config can name: a built-in name, or a mapping as in
``task.eval_benchmarks`` (YAML flow syntax; a mapping named after a built-in inherits its
fields). Three sections, each runnable alone (``--sections``):

- ``math``: per math benchmark, every gold answer graded against a completion that boxes it
  and one that writes it on an ``Answer:`` line (must be correct: the grader agrees with the
  dataset about its own answers), and wrong answers that must be graded wrong: for a numeric
  gold the number plus one, for any gold the gold of the next item when the two differ as
  text (two items can share a value written differently, so this second rate may fall short
  of 1 for a right reason; the disagreements are listed);
- ``code``: per code benchmark, the share of problems with a single test, and
  HumanEval+: every canonical solution on all its inputs under evalplus's time rule (a
  failure means a grader or sandbox problem, or a nondeterministic task), and a program
  that returns the first input's expected value for every input, which must fail;
  tests (LiveCodeBench, CodeForces): a program that looks up and prints each test's
  expected output (must pass: the grader agrees with the dataset's outputs) and one that
  prints it with its first token changed (must fail); statements that accept any valid
  answer, which one expected output cannot grade, are counted;
- ``sandbox``: hostile programs (:data:`HOSTILE`), each run as a graded code completion: it
  must score 0 with the reason recorded, leave nothing behind and leave the harness alive.
  A program whose guard the machine lacks (Landlock for writes and signals, a pids cgroup
  or a user namespace for processes, a network namespace) is reported, not run.
"""

from __future__ import annotations

import argparse
import ast
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

from disa.tasks.benchmarks import (  # noqa: E402
    CODE_BENCHMARKS,
    MATH_BENCHMARKS,
    BenchmarkSpec,
    benchmark_root,
    load_benchmark,
    resolve_entry,
)

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


def spec_of(entry: str | dict[str, Any]) -> BenchmarkSpec:
    """The spec of a benchmark entry: a built-in name (math or code) or a mapping."""
    return resolve_entry(entry, {**MATH_BENCHMARKS, **CODE_BENCHMARKS})


def _entry(text: str) -> str | dict[str, Any]:
    """A ``--benchmarks`` item: a name, or a mapping in YAML flow syntax."""
    from omegaconf import OmegaConf

    text = text.strip()
    return OmegaConf.to_container(OmegaConf.create(text)) if text.startswith("{") else text


def _found(spec: BenchmarkSpec, root: Path) -> str | None:
    """Why a benchmark cannot be measured here (its file is absent), or None."""
    if spec.dataset is not None:
        return None
    path = Path(spec.resolve(root).path)
    return None if path.exists() else f"{path} not found"


def math_agreement(
    root: Path, names: list, workers: int, limit: int | None = None
) -> dict[str, Any]:
    """Per benchmark (names or mappings): share of golds graded correct against themselves
    (strict completions) and share of wrong answers graded wrong; ``None`` grades (timeouts)
    counted."""
    from disa.tasks.math_reward import grade

    out: dict[str, Any] = {}
    for entry in names:
        spec = spec_of(entry)
        name = spec.name
        missing = _found(spec, root)
        if missing:
            out[name] = {"skipped": missing}
            continue
        df = load_benchmark(spec, root, limit=limit)
        golds = [str(g) for g in df.gold]
        t0 = time.perf_counter()
        boxed = grade(
            golds,
            [f"The final answer is \\boxed{{{g}}}." for g in golds],
            mode="strict",
            workers=workers,
        )
        marked = grade(
            golds, [f"Reasoning...\nAnswer: {g}" for g in golds], mode="strict", workers=workers
        )
        n_idx, n_wrong, o_idx, o_wrong = wrong_answers(golds)
        num = grade(
            [golds[i] for i in n_idx],
            [f"\\boxed{{{w}}}" for w in n_wrong],
            mode="strict",
            workers=workers,
        )
        other = grade(
            [golds[i] for i in o_idx],
            [f"\\boxed{{{w}}}" for w in o_wrong],
            mode="strict",
            workers=workers,
        )
        wall = time.perf_counter() - t0

        def rate(grades: list[float | None], want: float) -> dict[str, Any]:
            done = [g for g in grades if g is not None]
            return {
                "n": len(grades),
                "agree": sum(g == want for g in done),
                "missing": len(grades) - len(done),
                "rate": (sum(g == want for g in done) / len(grades)) if grades else None,
            }

        ids = df.prompt_id.tolist()
        out[name] = {
            "items": len(golds),
            "self_boxed": rate(boxed, 1.0)
            | {"failed_ids": [ids[i] for i, g in enumerate(boxed) if g != 1.0]},
            "self_answer_line": rate(marked, 1.0)
            | {"failed_ids": [ids[i] for i, g in enumerate(marked) if g != 1.0]},
            "wrong_numeric": rate(num, 0.0)
            | {"failed_ids": [ids[n_idx[j]] for j, g in enumerate(num) if g != 0.0]},
            "wrong_other_item": rate(other, 0.0)
            | {
                "equal_pairs": [
                    (golds[o_idx[j]], o_wrong[j]) for j, g in enumerate(other) if g == 1.0
                ][:10]
            },
            "wall_s": round(wall, 2),
        }
    return out


# -- code ----------------------------------------------------------------------------------
def _first_token_changed(text: str) -> str:
    """An output that differs from ``text`` under every comparison: its first token changed
    (an integer plus one, YES and NO swapped, else an ``x`` appended)."""
    tokens = text.split()
    if not tokens:
        return "x"
    t = tokens[0]
    if re.fullmatch(r"[+-]?\d+", t):
        new = str(int(t) + 1)
    elif t.lower() in ("yes", "no"):
        new = "NO" if t.lower() == "yes" else "YES"
    else:
        new = t + "x"
    return text.replace(t, new, 1)


def _changed_value(value: Any) -> Any:
    """A value that differs from ``value`` (functional tests)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, 0]
    return [value]


def lookup_program(problem: dict[str, Any], wrong: bool = False) -> str:
    """A program that answers each of the problem's tests from a table of their expected
    outputs (stdin/stdout: prints it; functional: returns it); ``wrong``: each answer
    changed. It passes every test iff the grader agrees with the dataset's outputs, and it is
    what a program that hard-codes the answers of a single test looks like."""
    from disa.tasks.code_reward import _fn_name_of, _parse_args, _parse_expected

    tests, fn = problem["tests"], _fn_name_of(problem)
    if fn is None:
        table = {
            str(t["input"]): (_first_token_changed if wrong else str)(str(t["output"]))
            for t in tests
        }
        return f"import sys\nT = {table!r}\nsys.stdout.write(T[sys.stdin.read()])\n"
    pairs = [[json.dumps(_parse_args(t["input"])), _parse_expected(t["output"])] for t in tests]
    if wrong:
        pairs = [[k, _changed_value(v)] for k, v in pairs]
    return (
        f"import json\nT = dict(json.loads({json.dumps(pairs)!r}))\n"
        f"class Solution:\n    def {fn}(self, *args):\n        return T[json.dumps(list(args))]\n"
    )


def _tally(grades: list, want: bool) -> dict[str, Any]:
    done = [g for g in grades if g.error is None]
    return {
        "n": len(grades),
        "agree": sum(g.all_passed == want for g in done),
        "missing": len(grades) - len(done),
    }


_ANY_ANSWER = re.compile(
    r"print any|output any|any of them|if there are (?:multiple|several)", re.I
)
_ANY_CASE = re.compile(
    r"in any case|any case \(|upper or lower|lowercase or uppercase|uppercase or lowercase|"
    r"in any register|case-insensitive",
    re.I,
)
_YES_NO = re.compile(r"\b(?:yes|no)\b", re.I)


def code_agreement(
    root: Path, entries: list, workers: int | None = None, limit: int | None = None
) -> dict[str, Any]:
    """Per code benchmark: the single-test share, and agreement with the reference answers
    (HumanEval+: canonical solutions under evalplus's time rule; tests: lookup programs), and
    rejection of wrong ones."""
    from disa.tasks.code_reward import evalplus_equal, grade_many, humaneval_expected

    out: dict[str, Any] = {}
    for entry in entries:
        spec = spec_of(entry)
        missing = _found(spec, root)
        if missing:
            out[spec.name] = {"skipped": missing}
            continue
        df = load_benchmark(spec, root, limit=limit)
        t0 = time.perf_counter()
        ids = df.prompt_id.tolist()
        r: dict[str, Any] = {
            "items": len(df),
            "layout": "humaneval" if spec.tests_field is None else "tests",
        }
        if spec.tests_field is None:
            n_inputs = [len(b) + len(p) for b, p in zip(df.base_input, df.plus_input)]
            r["single_test"] = sum(n == 1 for n in n_inputs)
            canon = grade_many(df, df.canonical_solution.tolist(), workers=workers)
            r["canonical"] = _tally(canon, True) | {
                "tests": int(sum(g.total for g in canon)),
                "failed": [
                    (i, g.statuses[:3], g.detail[:200])
                    for i, g in zip(ids, canon)
                    if not g.all_passed
                ][:10],
            }
            # a program that returns the first input's expected value for every input
            rows = df.to_dict("records")
            firsts, targets = [], []
            for row in rows:
                exp = humaneval_expected(row).expected
                try:  # a value whose repr is no literal (or an int past 4300 digits) cannot be hard-coded
                    literal = repr(exp[0])
                    ast.literal_eval(literal)
                    distinct = any(not evalplus_equal(e, exp[0], 0.0)[0] for e in exp)
                except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                    continue
                if distinct and row["entry_point"] != "find_zero":
                    targets.append(row)
                    firsts.append(f"def {row['entry_point']}(*args):\n    return {literal}\n")
            wrong = grade_many(targets, firsts, workers=workers)
            r["constant_wrong"] = _tally(wrong, False) | {
                "passed_ids": [t["prompt_id"] for t, g in zip(targets, wrong) if g.all_passed][:10]
            }
        else:
            r["single_test"] = int(sum(len(t) == 1 for t in df.tests))
            r["any_answer_statements"] = int(sum(bool(_ANY_ANSWER.search(p)) for p in df.problem))
            yes_no = [
                p
                for p, t in zip(df.problem, df.tests)
                if any(_YES_NO.search(str(x["output"])) for x in t)
            ]
            r["yes_no_problems"] = len(yes_no)
            r["yes_no_any_case_statements"] = int(sum(bool(_ANY_CASE.search(p)) for p in yes_no))
            rows = df.to_dict("records")
            right = grade_many(
                rows, [lookup_program(row) for row in rows], workers=workers, extract=False
            )
            wrong = grade_many(
                rows,
                [lookup_program(row, wrong=True) for row in rows],
                workers=workers,
                extract=False,
            )
            r["lookup_right"] = _tally(right, True) | {
                "failed": [
                    (i, g.statuses[:3], g.detail[:200])
                    for i, g in zip(ids, right)
                    if not g.all_passed
                ][:10]
            }
            r["lookup_wrong"] = _tally(wrong, False) | {
                "passed_ids": [i for i, g in zip(ids, wrong) if g.all_passed][:10]
            }
        r["single_test_share"] = r["single_test"] / len(df)
        r["wall_s"] = round(time.perf_counter() - t0, 2)
        out[spec.name] = r
    return out


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
    grader: str = (
        "stdio"  # "stdio": reads x from stdin; "functional": solve(x) is called by the driver
    )

    def program(self, places: dict[str, str]) -> str:
        body = self.source
        for key, value in places.items():  # not str.format: sources hold braces of their own
            body = body.replace("{" + key + "}", repr(value))
        fn = "def solve(x):\n" + "".join(f"    {line}\n" for line in body.splitlines())
        return (
            fn
            if self.grader == "functional"
            else fn + "\nimport sys\nprint(solve(sys.stdin.read().strip()))\n"
        )


_FORGE = "import __main__\n__main__._out.write(__main__.NONCE + {line!r} + '\\n')\n__main__._out.flush()\nreturn x"
_SPLIT = (
    "import os, time\nkids = []\nfor _ in range(3):\n    pid = os.fork()\n    if pid == 0:\n"
    "        b = bytearray(300 * 1024 * 1024)\n        time.sleep(0.5)\n        os._exit(0)\n    kids.append(pid)\n"
    "for k in kids:\n    os.waitpid(k, 0)\nreturn x"
)

#: The hostile programs, each a candidate solution of a problem whose correct answer echoes
#: the input; none may score.
HOSTILE: tuple[Hostile, ...] = (
    Hostile("infinite_loop", "while True:\n    pass", "timeout"),
    Hostile(
        "fork_bomb",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "timeout",
        needs="processes_limited",
    ),
    Hostile(
        "memory_hog", "xs = []\nwhile True:\n    xs.append(bytearray(50 * 1024 * 1024))", "memory"
    ),
    Hostile("memory_split_over_children", _SPLIT, "memory", needs="memory_limited"),
    Hostile(
        "fill_the_disk",
        "for i in range(40):\n    open(f'f{i}', 'wb').write(b'x' * 4 * 1024 * 1024)\nreturn x",
        "error",
        needs="disk_limited",
    ),
    Hostile(
        "write_outside_tmp",
        "open({marker}, 'w').write('escaped')\nreturn x",
        "error",
        needs="writes_confined",
    ),
    Hostile(
        "read_the_expected_answer",
        "return open({secret}).read().strip()",
        "error",
        needs="reads_confined",
    ),
    Hostile(
        "read_etc_shadow", "open('/etc/shadow').read()\nreturn x", "error", needs="reads_confined"
    ),
    Hostile(
        "list_home", "import os\nos.listdir({home})\nreturn x", "error", needs="reads_confined"
    ),
    Hostile(
        "read_project_files", "open({project}).read()\nreturn x", "error", needs="reads_confined"
    ),
    Hostile(
        "open_socket",
        "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=3)\nreturn x",
        "error",
        needs="network_isolated",
    ),
    Hostile(
        "unix_socket_daemon",
        "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({socket})\nreturn x",
        "error",
        needs="unix_sockets_blocked",
    ),
    Hostile(
        "kill_parent",
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nreturn x",
        "error",
        needs="signals_confined",
    ),
    # inside the pid namespace the parent's group is the program's own: it kills itself
    Hostile(
        "kill_parent_group",
        "import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)\nreturn x",
        "killed",
        needs="signals_confined",
    ),
    Hostile(
        "imitate_sandbox_failure",
        "import sys\nsys.stderr.write('unshare: unshare failed: Operation not permitted\\n')\nsys.exit(1)",
        "error",
    ),
    Hostile(
        "forge_undecodable_result",
        _FORGE.format(line='{"i": 0, "status": "ok", "value": {"__int__": "zz"}}'),
        "forged",
        grader="functional",
    ),
    Hostile(
        "forge_deep_result",
        _FORGE.format(line='{"i": 0, "status": "ok", "value": ' + "[" * 50000 + "]" * 50000 + "}"),
        "forged",
        grader="functional",
    ),
    Hostile(
        "forge_extra_result",
        _FORGE.format(line='{"i": 0, "status": "ok", "value": 7}'),
        "forged",
        grader="functional",
    ),
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
        places = {
            "secret": str(secret),
            "socket": str(Path(tmp, "daemon.sock")),
            "home": str(Path.home()),
            "project": str(REPO / "README.md"),
        }
        try:
            for h in HOSTILE:
                if h.needs and not have[h.needs]:
                    rows.append(
                        {
                            "program": h.name,
                            "status": "skipped",
                            "expected_status": h.status,
                            "reward": 0.0,
                            "reason": f"not run: this machine lacks the {h.needs} guard",
                            "harness_alive": True,
                            "escaped_file": False,
                            "wall_s": 0.0,
                        }
                    )
                    continue
                marker = Path(tempfile.gettempdir()) / f"disa-escape-{uuid.uuid4().hex}"
                program = h.program({**places, "marker": str(marker)})
                t0 = time.perf_counter()
                if h.grader == "functional":
                    g = grade_functional(
                        program,
                        "solve",
                        [{"input": [7], "output": 7}],
                        timeout_s=timeout_s,
                        memory_mb=512,
                        extract=False,
                    )
                else:
                    g = grade_stdio(
                        program,
                        [{"input": "7", "output": "7"}],
                        timeout_s=timeout_s,
                        memory_mb=512,
                        extract=False,
                    )
                rows.append(
                    {
                        "program": h.name,
                        "reward": float(g.all_passed),
                        "status": g.statuses[0] if g.statuses else g.error,
                        "expected_status": h.status,
                        "reason": g.detail.strip().splitlines()[-1] if g.detail.strip() else "",
                        "harness_alive": True,  # this line runs in the harness process: reaching it is the check
                        "escaped_file": marker.exists(),
                        "wall_s": round(time.perf_counter() - t0, 2),
                    }
                )
                if marker.exists():
                    marker.unlink()
        finally:
            daemon.close()
    return rows


# -- report ----------------------------------------------------------------------------------
def _f(x: dict[str, Any]) -> str:
    return f"{x['agree']}/{x['n']}" if x["n"] else "–"


def report(res: dict[str, Any]) -> str:
    lines: list[str] = []
    if "math" in res:
        lines += [
            "math: gold answers graded against themselves, and wrong answers",
            "| benchmark | items | self (boxed) | self (Answer:) | numeric+1 wrong | other item's gold wrong "
            "| missing | s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r in res["math"].items():
            if "skipped" in r:
                lines.append(f"| {name} | skipped: {r['skipped']} |")
                continue
            missing = sum(
                r[k]["missing"]
                for k in ("self_boxed", "self_answer_line", "wrong_numeric", "wrong_other_item")
            )
            lines.append(
                f"| {name} | {r['items']} | {_f(r['self_boxed'])} | {_f(r['self_answer_line'])} | "
                f"{_f(r['wrong_numeric'])} | {_f(r['wrong_other_item'])} | {missing} | {r['wall_s']} |"
            )
        lines.append("")
    if "code" in res:
        lines += [
            "code: reference answers graded right, wrong answers graded wrong",
            "| benchmark | items | reference passes | wrong rejected | single-test share | any-answer statements "
            "| YES/NO problems (any case stated) | missing | s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in res["code"].items():
            if "skipped" in r:
                lines.append(f"| {name} | skipped: {r['skipped']} |")
                continue
            ok, bad = (
                ("canonical", "constant_wrong")
                if r["layout"] == "humaneval"
                else ("lookup_right", "lookup_wrong")
            )
            extra = (
                f" ({r[ok]['tests']} tests, evalplus time rule)"
                if r["layout"] == "humaneval"
                else " (lookup)"
            )
            lines.append(
                f"| {name} | {r['items']} | {_f(r[ok])}{extra} | {_f(r[bad])} | {r['single_test']}/{r['items']} "
                f"({r['single_test_share']:.1%}) | {r.get('any_answer_statements', '–')} | "
                + (
                    f"{r['yes_no_problems']} ({r['yes_no_any_case_statements']}) | "
                    if "yes_no_problems" in r
                    else "– | "
                )
                + f"{r[ok]['missing'] + r[bad]['missing']} | {r['wall_s']} |"
            )
        lines.append("")
    if "sandbox" in res:
        lines += [
            f"sandbox: hostile programs (guards here: {res['guards']})",
            "| program | status | reward | reason | harness alive | file escaped | s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in res["sandbox"]:
            lines.append(
                f"| {r['program']} | {r['status']} | {r['reward']:.0f} | {r['reason'][:60]} | "
                f"{r['harness_alive']} | {r['escaped_file']} | {r['wall_s']} |"
            )
    return "\n".join(lines)


SECTIONS = ("math", "code", "sandbox")
DEFAULT_BENCHMARKS = "aime24,aime25,amc23,math500,minerva_math,olympiadbench,gsm8k,humanevalplus,livecodebench,codeforces"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--root",
        default=None,
        help="benchmark root (default: $DISA_BENCHMARKS or ../shared/benchmarks)",
    )
    p.add_argument(
        "--benchmarks",
        nargs="+",
        default=[DEFAULT_BENCHMARKS],
        help="built-in names (comma-separated) and/or mappings such as '{name: x, path: f.json, ...}'",
    )
    p.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, of {list(SECTIONS)}"
    )
    p.add_argument("--limit", type=int, default=None, help="items per benchmark (default: all)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--out", default="outputs/grading/report.json")
    a = p.parse_args(argv)
    sections = [x for x in a.sections.split(",") if x]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"--sections {unknown}: allowed: {list(SECTIONS)}")
    entries: list[str | dict[str, Any]] = []
    for item in a.benchmarks:
        entries += (
            [_entry(item)] if item.strip().startswith("{") else [x for x in item.split(",") if x]
        )
    specs = [(e, spec_of(e)) for e in entries]
    root = Path(a.root) if a.root else benchmark_root(REPO.parent / "shared" / "benchmarks")
    res: dict[str, Any] = {"root": str(root)}
    if "sandbox" in sections:
        res |= {"guards": guards(), "sandbox": containment()}
    if "code" in sections:
        res["code"] = code_agreement(
            root, [e for e, s in specs if s.kind == "code"], a.workers, a.limit
        )
    if "math" in sections:
        res["math"] = math_agreement(
            root, [e for e, s in specs if s.kind == "math"], a.workers, a.limit
        )
    print(report(res))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(
        json.dumps(
            res,
            indent=1,
            default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x),
        )
    )
    print(f"\nwrote {a.out}")
    return res


if __name__ == "__main__":
    main()
