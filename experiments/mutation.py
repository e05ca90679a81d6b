"""Mutation testing of the math modules, each against its own fast tests (mutmut 3).

    python experiments/mutation.py                    # every module in MODULES
    python experiments/mutation.py anchor losses      # some of them
    python experiments/mutation.py --list             # what each module mutates and runs
    make mutation [MODULES="anchor losses"]

A mutant is one small edit of the source (an operator swapped, a constant changed, ``min``
for ``max``, ...). The suite *kills* it when a test fails. A mutant that survives is a
change of behaviour no test notices, unless it is *equivalent*: no input can tell it from
the original. Equivalent mutants are listed, grouped by the reason, in
``experiments/mutation_equivalents/<module>.toml``; the score leaves them out:

    score = (killed + timeout) / (mutants − equivalent)

Each module is mutated in its own scratch directory, ``.mutation/<module>/`` (symlinks to
``disa/`` and ``tests/`` and a ``pyproject.toml`` with the module's ``[tool.mutmut]``), so
that its mutants run only the test files listed for it and a full run takes minutes.
mutmut keeps its results there; a rerun tests the mutants of changed functions and every
earlier survivor again.
Results go to ``.mutation/results.json``; the printed table is the one in
``docs/MUTATION.md``. Not part of the default test run: it is a tool for whoever changes
the math.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
SCRATCH = REPO / ".mutation"
EQUIVALENTS = REPO / "experiments" / "mutation_equivalents"


@dataclass(frozen=True)
class Module:
    # source files (globs, relative to the repo) whose functions are mutated
    mutate: tuple[str, ...]
    tests: tuple[str, ...]  # the pytest selection that must kill them
    covered_only: bool = False  # mutate only lines these tests execute (for mixed files); mutants
    # that no selected test reaches are then reported apart and left out of the score


MODULES: dict[str, Module] = {
    "anchor": Module(("disa/anchor/*.py",), ("tests/test_anchor.py", "tests/test_analysis.py")),
    "losses": Module(("disa/losses.py",), ("tests/test_losses.py",)),
    "evaluation": Module(("disa/evaluation.py",), ("tests/test_evaluation.py",)),
    "scoring": Module(("disa/scoring.py",), ("tests/test_scoring.py",)),
    "oracle": Module(("disa/oracle.py",), ("tests/test_sumpairs.py",)),
    # the statistics over seeds and of the bias-variance study
    "stats": Module(("disa/analysis/stats.py", "disa/studies.py"), ("tests/test_analysis.py",)),
    # The grading comparisons: math answer extraction and equivalence (math-verify), and the
    # code extraction and output comparison of code tests, called in-process. The rest of
    # those files (the worker pool, the sandbox) is process plumbing with its own fault
    # tests, so only the lines these tests reach count. Not tests/test_math_reward.py whole:
    # there grade_one runs only inside pool workers, which coverage does not see (so the
    # comparison itself went unmutated while the pool was), and its benchmark test needs
    # experiments/ beside the mutated tree.
    "grading": Module(
        ("disa/tasks/math_reward.py", "disa/tasks/code_reward.py"),
        (
            "tests/test_grading_compare.py",
            "tests/test_math_reward.py::test_last_boxed",
            "tests/test_math_reward.py::test_extract_strict_vs_lenient",
            "tests/test_sandbox.py::test_output_comparison",
        ),
        covered_only=True,
    ),
}

#: mutmut exit-code statuses (mutmut.stats.status_by_exit_code) that count as detected
DETECTED = {"killed", "timeout", "caught by type check", "segfault"}


def _toml_list(items) -> str:
    return "[" + ", ".join(json.dumps(str(i)) for i in items) + "]"


def prepare(name: str, mod: Module) -> Path:
    """The module's scratch directory: links to the code and a pyproject with its mutmut config."""
    work = SCRATCH / name
    work.mkdir(parents=True, exist_ok=True)
    for d in ("disa", "tests"):
        link = work / d
        if not link.is_symlink():
            link.symlink_to(REPO / d)
    base = (REPO / "pyproject.toml").read_text()
    if "[tool.mutmut]" in base:
        raise SystemExit(
            "pyproject.toml must not carry its own [tool.mutmut]: this script writes one per module"
        )
    (work / "pyproject.toml").write_text(
        base
        + "\n[tool.mutmut]\n"
        + 'source_paths = ["disa"]\n'
        + f"only_mutate = {_toml_list(mod.mutate)}\n"
        + f"pytest_add_cli_args_test_selection = {_toml_list(mod.tests)}\n"
        + 'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]\n'
        + f"mutate_only_covered_lines = {str(mod.covered_only).lower()}\n"
        # torch is not fork-safe once it has run: fork each mutant from a server that has
        # only imported and collected the tests
        + 'process_isolation = "forkserver"\n'
        + "use_git_change_detection = false\n"
    )
    return work


def load_equivalents() -> dict[str, dict]:
    """``{mutant: {"changed": line, "why": reason}}`` from every file in EQUIVALENTS.

    A file holds ``[[equivalent]]`` groups: a ``why`` (the argument that no input can tell
    these mutants from the original) and ``mutants``, each ``{mutant, changed}``: mutmut's
    name and the mutant's changed line, stripped. When the source moves and the line no
    longer matches, the entry is reported stale and the mutant counts again.
    """
    out: dict[str, dict] = {}
    for path in sorted(EQUIVALENTS.glob("*.toml")):
        for group in tomllib.loads(path.read_text()).get("equivalent", []):
            for m in group["mutants"]:
                out[m["mutant"]] = {"changed": m["changed"], "why": group["why"], "file": path.name}
    return out


def mutant_diff(work: Path, mutant: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "show", mutant],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def collect(work: Path) -> dict[str, str]:
    """``{mutant name: status}`` from mutmut's per-file ``.meta`` files."""
    from mutmut.stats import status_by_exit_code

    statuses = {}
    for meta in (work / "mutants").rglob("*.meta"):
        for key, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            statuses[key] = status_by_exit_code[code]
    return statuses


def run_module(name: str, mod: Module, equivalents: dict[str, dict], children: int) -> dict:
    work = prepare(name, mod)
    env = os.environ | {
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    print(f"== {name}: mutating {', '.join(mod.mutate)} against {', '.join(mod.tests)}", flush=True)

    def mutmut_run(*names: str) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *names],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        with open(work / "mutmut.log", "a") as log:
            log.write(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise SystemExit(
                f"mutmut run failed for {name} (exit {proc.returncode}); log {work / 'mutmut.log'}:\n{tail}"
            )

    (work / "mutmut.log").write_text("")
    mutmut_run()  # new mutants, and those of functions that changed since the last run
    # mutmut keeps a survivor's verdict while its function is unchanged, even when a new test
    # would now kill it: test the survivors again against today's tests
    again = sorted(k for k, s in collect(work).items() if s not in DETECTED)
    for i in range(0, len(again), 200):
        mutmut_run(*again[i : i + 200])
    statuses = collect(work)
    if not statuses:
        raise SystemExit(f"{name}: mutmut produced no mutants; log {work / 'mutmut.log'}")
    unreached = []
    if mod.covered_only:
        # Every mutated line of such a module ran under a selected test, so a mutant that no
        # selected test reaches sits on a line that runs at import only: a default value in
        # the signature of a function the selection never calls (a pool, the sandbox). It is
        # outside the module's scope, not a gap in its tests: reported, not scored.
        unreached = sorted(k for k, s in statuses.items() if s == "no tests")
        statuses = {k: s for k, s in statuses.items() if s != "no tests"}
    survivors = sorted(k for k, s in statuses.items() if s not in DETECTED)
    equivalent, stale, alive = [], [], []
    for k in survivors:
        diff = mutant_diff(work, k)
        eq = equivalents.get(k)
        added = [
            ln[1:].strip()
            for ln in diff.splitlines()
            if ln.startswith("+") and not ln.startswith("+++")
        ]
        if eq is not None and eq["changed"].strip() in added:
            equivalent.append(k)
        else:
            if eq is not None:  # the source moved under the entry: it no longer names this edit
                stale.append(k)
            alive.append({"mutant": k, "status": statuses[k], "diff": diff})
    total = len(statuses)
    detected = sum(s in DETECTED for s in statuses.values())
    counted = total - len(equivalent)
    return {
        "module": name,
        "mutants": total,
        "detected": detected,
        "equivalent": len(equivalent),
        "survived": len(alive),
        "score": detected / counted if counted else float("nan"),
        "survivors": alive,
        "stale_equivalents": stale,
        "unreached": unreached,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "modules", nargs="*", help=f"modules to run (default: all): {', '.join(MODULES)}"
    )
    ap.add_argument("--list", action="store_true", help="print what each module mutates and runs")
    ap.add_argument(
        "--children", type=int, default=2, help="mutants tested in parallel (default 2)"
    )
    ap.add_argument(
        "--compact", action="store_true", help="one line per surviving mutant instead of its diff"
    )
    ap.add_argument(
        "--min-score", type=float, default=0.95, help="exit 1 when a module scores below this"
    )
    args = ap.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        ap.error(f"unknown module(s) {unknown}; allowed: {list(MODULES)}")
    if args.list:
        for n, m in MODULES.items():
            print(
                f"{n:11s} mutate {' '.join(m.mutate)}  tests {' '.join(m.tests)}"
                + ("  (covered lines only)" if m.covered_only else "")
            )
        return 0
    equivalents = load_equivalents()
    results = [
        run_module(n, MODULES[n], equivalents, args.children) for n in (args.modules or MODULES)
    ]
    SCRATCH.mkdir(exist_ok=True)
    (SCRATCH / "results.json").write_text(json.dumps(results, indent=1))
    for r in results:
        for s in r["survivors"]:
            if args.compact:  # one line each: name, status, the removed and added lines
                edit = [
                    ln.strip()
                    for ln in s["diff"].splitlines()
                    if ln[:1] in "+-" and not ln.startswith(("+++", "---"))
                ]
                print(f"{s['mutant']} ({s['status']}): " + " => ".join(edit))
            else:
                print(f"\n-- survived ({s['status']}): {s['mutant']}\n{s['diff']}")
        if r["unreached"]:
            print(
                f"\n{r['module']}: {len(r['unreached'])} mutants on import-time lines no selected test "
                f"calls, left out of the score: {', '.join(r['unreached'])}"
            )
        for k in r["stale_equivalents"]:
            print(f"\n!! {k} is listed as equivalent, but its diff no longer matches the entry")
    print("\n| module | mutants | equivalent | killed | survived | score |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r['module']} | {r['mutants']} | {r['equivalent']} | {r['detected']} | {r['survived']} "
            f"| {100 * r['score']:.1f}% |"
        )
    return int(any(r["score"] < args.min_score for r in results))


if __name__ == "__main__":
    sys.exit(main())
