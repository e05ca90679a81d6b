"""The public layouts of the code benchmarks (HumanEval+ release and OriginFmt, rllm json
LiveCodeBench and CodeForces), read by path and field mapping, and graded by the rules of
their reference evaluators. Data: small excerpts in tests/fixtures (see its README)."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

from disa.tasks.benchmarks import CODE_BENCHMARKS, load_benchmark, load_records, resolve_entry
from disa.tasks.code_layouts import (
    TestCodeError,
    functional_name,
    parse_originfmt_test,
    statement_limits,
)
from disa.tasks.code_reward import grade_humaneval, grade_many, humaneval_expected
from disa.tasks.reasoning import BenchmarkTask

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _code(entry):
    return resolve_entry(entry, CODE_BENCHMARKS, "code")


# -- file formats: detected from the content ---------------------------------------------------
def test_format_is_read_from_the_content_not_the_extension(tmp_path):
    rows = [
        {"problem": "p1", "tests": [{"input": "1", "output": "1"}]},
        {"problem": "p2", "tests": []},
    ]
    (tmp_path / "list.jsonl").write_text(json.dumps(rows, indent=2))  # a JSON list at a .jsonl path
    assert load_records(tmp_path / "list.jsonl") == rows
    (tmp_path / "lines.json").write_text(
        "".join(json.dumps(r) + "\n" for r in rows)
    )  # JSON lines at .json
    assert load_records(tmp_path / "lines.json") == rows
    with gzip.open(tmp_path / "packed.json", "wt") as f:  # gzip without the .gz suffix
        f.write(json.dumps({"data": rows}))
    assert load_records(tmp_path / "packed.json") == rows
    (tmp_path / "one.jsonl").write_text(json.dumps(rows[0]) + "\n")  # a single JSON line
    assert load_records(tmp_path / "one.jsonl") == rows[:1]


def test_format_errors_say_how_the_file_was_read(tmp_path):
    (tmp_path / "bad.jsonl").write_text('[{"a": 1},\n{"b": ]')
    with pytest.raises(
        ValueError, match=r"bad\.jsonl: starts with '\[', so it was read as one JSON list"
    ):
        load_records(tmp_path / "bad.jsonl")
    (tmp_path / "bad2.json").write_text('{"a": 1}\n{"b": 2\n')
    with pytest.raises(ValueError, match=r"bad2\.json:2: invalid JSON \(read as JSON lines"):
        load_records(tmp_path / "bad2.json")
    (tmp_path / "t.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"unknown format: starts with 'a,b"):
        load_records(tmp_path / "t.csv")


# -- mappings --------------------------------------------------------------------------------
def test_a_mapping_named_after_a_built_in_inherits_its_fields():
    spec = _code({"name": "codeforces", "path": "/data/cf.json"})
    assert (
        spec.path == "/data/cf.json" and spec.tests_field == "tests" and spec.limits_from_statement
    )
    assert spec.output_compare == "tokens" and spec.answer_field is None
    from disa.tasks.benchmarks import MATH_BENCHMARKS

    aime = resolve_entry({"name": "aime24", "path": "/data/a.jsonl"}, MATH_BENCHMARKS, "math")
    assert (aime.problem_field, aime.answer_field, aime.id_field) == ("problem", "answer", "id")
    hub = resolve_entry({"name": "aime24", "dataset": "org/aime"}, MATH_BENCHMARKS, "math")
    assert hub.path is None and hub.dataset == "org/aime"  # the source is replaced, not merged
    # a code mapping needs no answer_field; a mapping without problem_field is named
    assert (
        _code(
            {"name": "mine", "path": "x.json", "problem_field": "q", "tests_field": "t"}
        ).answer_field
        is None
    )
    with pytest.raises(
        ValueError, match=r"benchmark 'mine': problem_field is missing; allowed: the field"
    ):
        _code({"name": "mine", "path": "x.json"})
    with pytest.raises(ValueError, match=r"output_compare='exact'; allowed: \['tokens', 'lines'\]"):
        _code({"name": "codeforces", "path": "x.json", "output_compare": "exact"})


def test_code_rows_without_usable_tests_are_refused_naming_them(tmp_path):
    rows = [
        {"problem": "ok", "tests": [{"input": "1", "output": "1"}]},
        {"problem": "none", "tests": []},
        {"problem": "half", "tests": [{"input": "1"}]},
        {"problem": "fn", "tests": [{"input": "1", "output": "1", "testtype": "functional"}]},
    ]
    (tmp_path / "c.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError) as e:
        load_benchmark(
            _code(
                {
                    "name": "c",
                    "path": str(tmp_path / "c.json"),
                    "problem_field": "problem",
                    "tests_field": "tests",
                }
            )
        )
    msg = str(e.value)
    assert "3 item(s) with no usable tests" in msg
    assert "no tests: ids [1]" in msg and "test 0 lacks an input or an output: ids [2]" in msg
    assert "functional tests without a function name" in msg and "ids [3]" in msg
    he = [
        {
            "task_id": "T/0",
            "prompt": "def f(x):\n",
            "entry_point": "f",
            "canonical_solution": "    return x\n",
            "base_input": [],
            "plus_input": [],
            "atol": 0,
        }
    ]
    (tmp_path / "he.jsonl").write_text(json.dumps(he[0]) + "\n")
    with pytest.raises(
        ValueError,
        match=r"1 item\(s\) with no usable tests \(HumanEval\+ inputs\): no inputs: ids \[T/0\]",
    ):
        load_benchmark(_code({"name": "humanevalplus", "path": str(tmp_path / "he.jsonl")}))


# -- HumanEval+ OriginFmt ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def originfmt() -> dict[str, dict]:
    with open(FIXTURES / "humanevalplus_originfmt.jsonl") as f:
        return {r["task_id"]: r for r in map(json.loads, f)}


def test_originfmt_test_code_is_read_not_run(tmp_path, originfmt):
    parsed = parse_originfmt_test(originfmt["HumanEval/2"]["test"])
    assert parsed["atol"] == 1e-6 and len(parsed["inputs"]) == len(parsed["expected"]) == 8
    assert parsed["inputs"][0] == [3.5] and parsed["expected"][0] == 0.5
    zero = parse_originfmt_test(originfmt["HumanEval/32"]["test"])
    assert zero["atol"] == 1e-4  # from `assert _poly(...) <= 0.0001`
    cross = parse_originfmt_test(originfmt["HumanEval/14"]["test"])
    assert cross["expected"] is None and cross["inputs"][1] == [
        "asdfgh"
    ]  # ref_func: the canonical decides
    marker = tmp_path / "ran"
    hostile = (
        f"open({str(marker)!r}, 'w').write('x')\n"
        "def check(candidate):\n    inputs = [[1], [float('inf')]]\n    results = [1, 2]\n"
        "    for i, (inp, exp) in enumerate(zip(inputs, results)):\n        assertion(candidate(*inp), exp, 0)\n"
    )
    with pytest.raises(
        TestCodeError, match="not a literal"
    ):  # float('inf') is a call: refused, not run
        parse_originfmt_test(hostile)
    assert not marker.exists()
    ok = hostile.replace("float('inf')", "inf").replace(
        "results = [1, 2]", "results = [nan, {1, 2}]"
    )
    got = parse_originfmt_test(ok)
    assert (
        got["inputs"][1] == [math.inf]
        and math.isnan(got["expected"][0])
        and got["expected"][1] == {1, 2}
    )
    assert not marker.exists()
    for broken, why in [
        ("def f(:", "does not parse"),
        ("x = 1", "no `def check"),
        ("def check(candidate):\n    results = [1]\n    assertion(1, 1, 0)", "no `inputs"),
        (
            "def check(candidate):\n    inputs = [[1]]\n    results = [1, 2]\n    assertion(1, 1, 0)",
            "not a list of 1 values",
        ),
        ("def check(candidate):\n    inputs = [[1]]\n    results = [1]\n", "no `assertion"),
    ]:
        with pytest.raises(TestCodeError, match=why):
            parse_originfmt_test(broken)


def test_originfmt_loads_by_path_and_its_canonical_solutions_pass(originfmt):
    df = load_benchmark(
        _code({"name": "humanevalplus", "path": str(FIXTURES / "humanevalplus_originfmt.jsonl")})
    )
    assert df.prompt_id.tolist() == [f"humanevalplus-{t}" for t in originfmt]
    assert df.set_index("entry_point").atol.to_dict()["find_zero"] == 1e-4
    grades = grade_many(df, df.canonical_solution.tolist(), workers=2)
    assert [g.all_passed for g in grades] == [True] * len(df), [g.detail for g in grades]
    assert [g.total for g in grades] == [15, 8, 8, 9, 12]
    wrong = [f"def {e}(*args):\n    return None\n" for e in df.entry_point]
    assert not any(g.all_passed for g in grade_many(df, wrong, workers=2))


def test_find_zero_is_graded_by_the_polynomial_with_the_tests_tolerance(originfmt):
    """Any root within OriginFmt's atol 1e-4 passes, as evalplus's oracle says; the canonical
    root itself is not required (an exact comparison with `results` would fail this one)."""
    task = originfmt["HumanEval/32"]
    ref = humaneval_expected(task)
    # bisection to 1e-7 only: roots near the canonical ones, but not equal to them
    coarse = (
        "def find_zero(xs):\n    lo, hi = -1e3, 1e3\n    while hi - lo > 1e-7:\n"
        "        mid = (lo + hi) / 2\n        if poly(xs, lo) * poly(xs, mid) <= 0:\n            hi = mid\n"
        "        else:\n            lo = mid\n    return lo\n"
    )
    g = grade_humaneval(task, coarse, expected=ref)
    assert g.all_passed, g.detail
    off = coarse.replace("return lo", "return lo + 0.01")  # no longer a root
    assert grade_humaneval(task, off, expected=ref).passed == 0


def test_evalplus_time_rule_and_the_config_limit(originfmt):
    """Each input runs under max(floor, factor × the canonical solution's time): a program
    that sleeps 0.3 s per call passes under evalplus's 4 s floor and times out under a 0.1 s
    floor; a config timeout_s replaces the rule."""
    task = originfmt["HumanEval/53"]
    ref = humaneval_expected(task)
    assert len(ref.seconds) == 12 and all(0 <= t < 0.1 for t in ref.seconds)
    slow = "import time\ndef add(x, y):\n    time.sleep(0.3)\n    return x + y\n"
    few = {
        **task,
        "task_id": "HumanEval/53-few",
        "base_input": [[0, 1], [2, 3]],
        "plus_input": [],
        "atol": 0.0,
        "expected": None,
    }
    few_ref = humaneval_expected(few)
    assert grade_humaneval(few, slow, expected=few_ref).all_passed
    g = grade_humaneval(few, slow, expected=few_ref, min_time_limit_s=0.1)
    assert g.statuses == ["timeout", "timeout"]
    assert grade_humaneval(few, slow, expected=few_ref, timeout_s=0.1).statuses == [
        "timeout",
        "timeout",
    ]


# -- rllm json: CodeForces and LiveCodeBench ------------------------------------------------------
@pytest.fixture(scope="module")
def codeforces():
    return load_benchmark(
        _code({"name": "codeforces", "path": str(FIXTURES / "codeforces_rllm.json")})
    )


def test_codeforces_rllm_layout_loads_with_the_statements_limits(codeforces):
    assert len(codeforces) == 5 and codeforces.prompt_id.iloc[0] == "codeforces-0"
    assert codeforces.time_limit_s.tolist() == [1.0, 1.0, 1.0, 2.0, 2.0]
    assert codeforces.memory_limit_mb.tolist() == [256, 256, 256, 256, 512]
    assert [len(t) for t in codeforces.tests] == [1, 1, 1, 4, 5]
    assert statement_limits(
        "time limit per test: 2.5 seconds\nmemory limit per test: 1 gigabyte"
    ) == (2.5, 1024)
    assert statement_limits("no limits stated") == (None, None)


def test_codeforces_yes_no_in_any_case_and_real_numbers_within_tolerance(codeforces):
    cubes = codeforces.iloc[[1]]  # "Yes"/"No", any case accepted by the statement
    lower = (
        "t = int(input())\nfor _ in range(t):\n    n, m = map(int, input().split())\n"
        "    print('yes' if n >= m and (n - m) % 2 == 0 else 'no')\n"
    )
    assert grade_many(cubes, [lower])[0].all_passed
    assert not grade_many(cubes, [lower.replace("'yes' if", "'no' if")])[0].all_passed
    casino = codeforces.iloc[[3]]  # real-valued answers, 1e-6 absolute or relative error
    table = {t["input"]: t["output"] for t in casino.tests.iloc[0]}
    nudged = f"import sys\nT = {table!r}\nprint(float(T[sys.stdin.read()]) + 1e-7)\n"
    assert grade_many(casino, [nudged])[0].all_passed
    assert not grade_many(casino, [nudged.replace("1e-7", "1e-3")])[0].all_passed
    lines = casino.assign(output_compare="lines")  # LiveCodeBench's rule: decimals must be equal
    assert not grade_many(lines, [nudged])[0].all_passed


def test_a_statements_time_limit_applies_unless_the_config_sets_one(tmp_path):
    """A program that sleeps 3 s fails a problem whose statement says 1 s, and fails under
    task.grader.timeout_s=1 whatever the statement says."""
    rows = [
        {
            "problem": "Echo.\nTime Limit: 1000 ms\nMemory Limit: 256 MB",
            "tests": [{"input": "7", "output": "7"}],
        },
        {"problem": "Echo, no limit stated.", "tests": [{"input": "7", "output": "7"}]},
    ]
    (tmp_path / "cf.json").write_text(json.dumps(rows))
    entry = {"name": "codeforces", "path": str(tmp_path / "cf.json")}
    sleeper = "import time\ntime.sleep(3)\nprint(input())\n"
    task = BenchmarkTask("code", "code", None, [entry], grader={"workers": 2})
    prompts = task.prompts("test")
    assert task.rewards(prompts, [sleeper, sleeper]).tolist() == [0.0, 1.0]
    strict = BenchmarkTask("code", "code", None, [entry], grader={"workers": 2, "timeout_s": 1})
    details = strict.reward_details(prompts, [sleeper, "print(input())"])
    assert details.reward.tolist() == [0.0, 1.0]


def test_livecodebench_rllm_layout_functional_names_from_starter_code():
    df = load_benchmark(
        _code({"name": "livecodebench", "path": str(FIXTURES / "livecodebench_rllm.json")})
    )
    assert [n if isinstance(n, str) else None for n in df.fn_name] == [
        None,
        None,
        "smallestNumber",
        "smallestNumber",
    ]
    assert (
        "```python\nclass Solution:\n    def smallestNumber(self, n: int) -> int:"
        in df.problem.iloc[2]
    )
    assert set(df.output_compare) == {"lines"} and set(df.prelude) == {"livecodebench"}
    second = (
        "n = int(input())\na = list(map(int, input().split()))\nprint(a.index(sorted(a)[-2]) + 1)\n"
    )
    # Optional comes from LiveCodeBench's prelude of imports, as under its own grader
    ones = (
        "class Solution:\n    def smallestNumber(self, n: int) -> Optional[int]:\n        x = 1\n"
        "        while x < n:\n            x = 2 * x + 1\n        return x\n"
    )
    digits = (
        "class Solution:\n    def smallestNumber(self, n, t):\n        while prod(map(int, str(n))) % t:\n"
        "            n += 1\n        return n\n"
    )
    grades = grade_many(df.iloc[1:], [second, ones, digits], workers=2)
    assert [g.all_passed for g in grades] == [True, True, True], [g.detail for g in grades]
    no_prelude = df.iloc[2:4].assign(prelude=None)
    assert [g.statuses[0] for g in grade_many(no_prelude, [ones, digits])] == [
        "load_error",
        "error",
    ]
    assert (
        functional_name(
            [{"input": "1", "output": "1", "testtype": "functional"}], {"func_name": "f"}
        )
        == "f"
    )
    assert (
        functional_name(
            [{"input": "1", "output": "1", "testtype": "functional"}], None, "def g(x):\n"
        )
        == "g"
    )


# -- the grading report takes any configured benchmark, one section at a time ----------------------
def test_grading_report_code_section_on_configured_benchmarks(repo, tmp_path):
    import sys

    sys.path.insert(0, str(repo / "experiments"))
    import grading_report

    res = grading_report.main(
        [
            "--sections",
            "code",
            "--workers",
            "2",
            "--out",
            str(tmp_path / "r.json"),
            "--benchmarks",
            f"{{name: codeforces, path: {FIXTURES / 'codeforces_rllm.json'}}}",
            f"{{name: lcb_excerpt, like: livecodebench, path: {FIXTURES / 'livecodebench_rllm.json'}}}",
            f"{{name: he_origin, like: humanevalplus, path: {FIXTURES / 'humanevalplus_originfmt.jsonl'}}}",
        ]
    )
    assert set(res) == {"root", "code"}  # no math, no sandbox: sections run alone
    cf, lcb, he = res["code"]["codeforces"], res["code"]["lcb_excerpt"], res["code"]["he_origin"]
    assert (cf["single_test"], cf["items"], cf["any_answer_statements"]) == (3, 5, 1)
    assert cf["lookup_right"]["agree"] == 5 and cf["lookup_wrong"]["agree"] == 5
    assert (
        lcb["lookup_right"]["agree"] == 4
        and lcb["lookup_wrong"]["agree"] == 4
        and lcb["single_test"] == 0
    )
    assert he["canonical"]["agree"] == 5 and he["canonical"]["tests"] == 52
    assert (
        he["constant_wrong"]["agree"] == he["constant_wrong"]["n"] == 4
    )  # find_zero has no single answer
    assert (
        json.loads((tmp_path / "r.json").read_text())["code"]["codeforces"]["single_test_share"]
        == 0.6
    )


def _full(name: str) -> Path:
    from disa.tasks.benchmarks import benchmark_root

    root = benchmark_root(Path(__file__).resolve().parents[2] / "shared" / "benchmarks")
    path = (root or Path("/nonexistent")) / "code" / name
    if not path.is_file():
        pytest.skip(
            f"{path} is absent (the full public file; set DISA_BENCHMARKS to a root holding code/{name})"
        )
    return path


def test_full_codeforces_set_loads_with_limits_and_counts():
    """FlowRL's CodeForces test set (rllm json), when present: 408 problems, 378 with a single
    test, every statement's limits read."""
    df = load_benchmark(_code({"name": "codeforces", "path": str(_full("codeforces.json"))}))
    assert len(df) == 408 and int(sum(len(t) == 1 for t in df.tests)) == 378
    assert df.time_limit_s.notna().all() and df.memory_limit_mb.notna().all()


def test_full_humanevalplus_originfmt_loads():
    """The full OriginFmt release, when present: 164 tasks, find_zero at atol 1e-4."""
    df = load_benchmark(
        _code({"name": "humanevalplus", "path": str(_full("HumanEvalPlus-OriginFmt.jsonl"))})
    )
    assert len(df) == 164 and df.set_index("entry_point").atol["find_zero"] == 1e-4


def test_limits_from_the_benchmarks_own_fields(tmp_path):
    """Layouts that carry limits as fields (open-r1's CodeForces: seconds and MiB)."""
    rows = [
        {
            "id": "a",
            "statement": "s",
            "tests": [{"input": "1", "output": "1"}],
            "time_limit": 2.5,
            "memory_limit": 256,
        },
        {
            "id": "b",
            "statement": "s",
            "tests": [{"input": "1", "output": "1"}],
            "time_limit": None,
            "memory_limit": "n/a",
        },
    ]
    (tmp_path / "cf.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    df = load_benchmark(
        _code(
            {
                "name": "cf",
                "path": str(tmp_path / "cf.jsonl"),
                "problem_field": "statement",
                "id_field": "id",
                "tests_field": "tests",
                "time_limit_field": "time_limit",
                "memory_limit_field": "memory_limit",
            }
        )
    )
    assert df.time_limit_s.iloc[0] == 2.5 and df.memory_limit_mb.iloc[0] == 256
    assert math.isnan(df.time_limit_s.iloc[1]) and math.isnan(
        df.memory_limit_mb.iloc[1]
    )  # none stated: defaults


def test_benchmarks_of_several_layouts_in_one_task():
    """One evaluation suite mixing HumanEval+ and CodeForces rows: each row is graded by its
    own layout's rules (the columns another layout lacks are NaN in the joined table)."""
    entries = [
        {
            "name": "he",
            "like": "humanevalplus",
            "path": str(FIXTURES / "humanevalplus_originfmt.jsonl"),
        },
        {"name": "codeforces", "path": str(FIXTURES / "codeforces_rllm.json")},
    ]
    task = BenchmarkTask("code", "code", None, entries, grader={"workers": 2}, limit=2)
    prompts = task.prompts("test")
    assert prompts.benchmark.tolist() == ["he", "he", "codeforces", "codeforces"]
    he = prompts.iloc[:2]
    first = "t = int(input())\nfor _ in range(t):\n    x, y = map(int, input().split())\n    print(min(x, y), max(x, y))\n"
    cubes = "for _ in range(int(input())):\n    n, m = map(int, input().split())\n    print('YES' if n >= m and (n - m) % 2 == 0 else 'NO')\n"
    rewards = task.rewards(prompts, [*he.canonical_solution, first, cubes])
    assert rewards.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_task_identity_follows_the_grading_settings():
    """Rewards cached under one grading setting are not reused under another: the limits are
    part of the task's identity, the number of graders is not."""
    entry = {"name": "codeforces", "path": str(FIXTURES / "codeforces_rllm.json")}

    def spec(**grader):
        return BenchmarkTask("code", "code", None, [entry], grader=grader).spec()

    assert spec(workers=1, timeout_s=1) == spec(workers=4, timeout_s=1, require_isolation=True)
    assert spec(timeout_s=1) != spec(timeout_s=2) and spec() != spec(memory_mb=256)
    other = {**entry, "output_compare": "lines"}
    assert BenchmarkTask("code", "code", None, [other]).spec()["data"] != spec()["data"]
