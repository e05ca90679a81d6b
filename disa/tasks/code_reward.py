"""Code rewards: run a completion's program against tests in the sandbox
(:mod:`disa.sandbox`) and report the fraction of tests passed.

Three kinds of tests:

* **stdin/stdout** (LiveCodeBench "stdin", CodeForces): ``[{"input": str, "output": str}]``;
  one sandboxed run per test; outputs compared line by line after stripping and collapsing
  whitespace (:func:`normalize_output`).
* **functional** (LiveCodeBench "functional", LeetCode style): call a named function (or a
  method of ``class Solution``) with arguments; ``[{"input": args, "output": value}]`` where
  ``args`` is a list, or LiveCodeBench's text with one JSON value per line, and ``output``
  is a value or its JSON text.
* **HumanEval+**: records with ``prompt``, ``entry_point``, ``canonical_solution``,
  ``base_input``, ``plus_input``, ``atol``; expected outputs come from running the canonical
  solution (also in the sandbox), compared as EvalPlus does (exact, or ``atol`` / 1e-6 for
  floats; ``find_zero`` checked by the polynomial's value).

Functional and HumanEval tests run in *one* sandboxed process per (program, test set): a
driver executes the program and calls the function on each input under a per-test timer,
and writes only the *return values* back. The comparison with the expected values happens
here, in the parent, so a program cannot report its own success (the expected values are
never inside the sandbox). Values cross the process boundary as tagged JSON
(:func:`_decode`), never pickle or ``eval``.

A :class:`CodeGrade` whose ``error`` is set means grading itself failed (the sandbox could
not start, the canonical solution failed): its ``pass_fraction`` is NaN — missing, not 0.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from disa.sandbox import ExecResult, run_program

__all__ = [
    "CodeGrade",
    "merge_guards",
    "missing_sandbox_guards",
    "extract_code",
    "grade_functional",
    "grade_humaneval",
    "grade_many",
    "grade_stdio",
    "humaneval_expected",
    "humaneval_program",
    "normalize_output",
    "outputs_match",
    "problem_kind",
]


@dataclass
class CodeGrade:
    """Result of grading one program.

    ``statuses`` has one entry per test: ``passed``, ``wrong``, ``error``, ``timeout``,
    ``memory``, ``not_run`` (the process died or was stopped before reaching it),
    ``forged`` (the driver's result lines were tampered with: every test of that run fails),
    or a sandbox status. ``error`` is set when grading itself failed (then ``pass_fraction``
    is NaN and ``all_passed`` False: count it as missing). ``guards``: the sandbox guards
    that confined *every* run of this grade (:data:`disa.sandbox.GUARDS`).
    """

    passed: int
    total: int
    statuses: list[str] = field(default_factory=list)
    error: str | None = None
    detail: str = ""  # first failure, for debugging (stderr tail, wrong output, ...)
    guards: dict[str, bool] = field(default_factory=dict)

    @property
    def pass_fraction(self) -> float:
        if self.error is not None or self.total == 0:
            return float("nan")
        return self.passed / self.total

    @property
    def all_passed(self) -> bool:
        return self.error is None and self.total > 0 and self.passed == self.total

    def to_dict(self) -> dict[str, Any]:
        return {
            "pass_fraction": self.pass_fraction,
            "all_passed": self.all_passed,
            "passed": self.passed,
            "total": self.total,
            "error": self.error,
            "detail": self.detail,
            **{f"sandbox_{g}": v for g, v in self.guards.items()},
        }


# --------------------------------------------------------------------------------------
# code extraction and output comparison
# --------------------------------------------------------------------------------------
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_PY_LANGS = {"python", "py", "python3", "py3"}


def extract_code(completion: str) -> str:
    """The program in a completion: the last ```` ```python ```` fenced block; else the last
    fenced block without a language; else the whole text. An unclosed final fence (a
    truncated completion) counts as closed at the end of the text."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(completion)]
    for langs in (_PY_LANGS, {""}):
        chosen = [code for lang, code in blocks if lang in langs]
        if chosen:
            return chosen[-1].strip("\n")
    return completion.strip("\n")


def normalize_output(text: str) -> list[str]:
    """Lines of ``text`` with surrounding whitespace stripped and inner runs of whitespace
    collapsed to one space; leading and trailing blank lines dropped."""
    return [" ".join(line.split()) for line in text.strip().splitlines()]


def _has_float(x: Any) -> bool:
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple, set, frozenset)):
        return any(_has_float(v) for v in x)
    if isinstance(x, dict):
        return any(_has_float(v) for v in x.values())
    return False


def _close(out: Any, exp: Any, atol: float, rtol: float) -> bool:
    if isinstance(exp, bool) or isinstance(out, bool):
        return type(out) is type(exp) and out == exp
    if isinstance(exp, (int, float)) and isinstance(out, (int, float)):
        if isinstance(exp, float) and math.isnan(exp):
            return isinstance(out, float) and math.isnan(out)
        if out == exp:
            return True
        if math.isinf(exp) or math.isinf(out):
            return False
        return abs(out - exp) <= atol + rtol * abs(exp)
    if isinstance(exp, (list, tuple)):
        return (
            type(out) is type(exp)
            and len(out) == len(exp)
            and all(_close(o, e, atol, rtol) for o, e in zip(out, exp))
        )
    if isinstance(exp, dict):
        return (
            isinstance(out, dict)
            and out.keys() == exp.keys()
            and all(_close(out[k], exp[k], atol, rtol) for k in exp)
        )
    return out == exp


def outputs_match(out: Any, exp: Any, atol: float = 0.0, *, rtol: float = 1e-7) -> bool:
    """EvalPlus-style comparison: exact equality, or — when ``atol`` > 0 or the expected
    value contains floats (then ``atol`` defaults to 1e-6) — element-wise
    ``|out - exp| <= atol + rtol * |exp|`` with the same container types and lengths."""
    try:
        if out == exp and type(out) is type(exp):
            return True
    except Exception:
        return False
    if atol == 0 and _has_float(exp):
        atol = 1e-6
    if atol == 0:
        return False
    try:
        return _close(out, exp, atol, rtol)
    except Exception:
        return False


def _lists_for_tuples(x: Any) -> Any:
    """JSON has no tuples: compare a returned tuple with an expected JSON list."""
    if isinstance(x, (list, tuple)):
        return [_lists_for_tuples(v) for v in x]
    if isinstance(x, dict):
        return {k: _lists_for_tuples(v) for k, v in x.items()}
    return x


# --------------------------------------------------------------------------------------
# values across the sandbox boundary: tagged JSON
# --------------------------------------------------------------------------------------
class _Opaque:
    """A returned value of a type JSON cannot carry; equal iff same type name and repr."""

    def __init__(self, type_name: str, text: str) -> None:
        self.type_name, self.text = type_name, text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Opaque) and (self.type_name, self.text) == (
            other.type_name,
            other.text,
        )

    def __hash__(self) -> int:
        return hash((self.type_name, self.text))

    def __repr__(self) -> str:
        return f"<{self.type_name} {self.text}>"


def _decode(x: Any) -> Any:
    if isinstance(x, list):
        return [_decode(v) for v in x]
    if isinstance(x, dict):
        if "__int__" in x:
            return int(str(x["__int__"]), 16)
        if "__digest__" in x:
            return _Opaque(f"digest of {x.get('__type__')}", str(x["__digest__"]))
        if "__tuple__" in x:
            return tuple(_decode(v) for v in x["__tuple__"])
        if "__set__" in x:
            items = [_decode(v) for v in x["__set__"]]
            try:
                return set(items)
            except TypeError:
                return _Opaque("set", repr(items))
        if "__dict__" in x:
            pairs = [(_decode(k), _decode(v)) for k, v in x["__dict__"]]
            try:
                return dict(pairs)
            except TypeError:
                return _Opaque("dict", repr(pairs))
        if "__repr__" in x:
            return _Opaque(str(x.get("__type__")), str(x["__repr__"]))
    return x


# The driver is a real script beside this module (see its docstring); the sandbox runs its
# source as the program.
_DRIVER = (Path(__file__).with_name("code_driver.py")).read_text(encoding="utf-8")


# Return values whose JSON is longer than this come back as a SHA-256 digest (exact
# comparison only; no float tolerance for such values).
_MAX_VALUE_CHARS = 256 * 1024


@dataclass
class _CallResults:
    load: str  # ok | error | timeout | missing | crashed
    statuses: list[str]  # per input: ok | error | timeout | memory | not_run
    values: list[Any]
    run: ExecResult
    error: str = ""


def _run_calls(
    program: str,
    fn_name: str,
    inputs: Sequence[Sequence[Any]],
    *,
    timeout_s: float,
    max_total_s: float,
    memory_mb: int,
    require: Sequence[str] = (),
) -> _CallResults:
    """Run ``program`` in the sandbox and call ``fn_name(*args)`` for each input."""
    nonce = secrets.token_hex(8)
    cfg = {
        "fn_name": fn_name,
        "inputs": [list(a) for a in inputs],
        "timeout": timeout_s,
        "load_timeout": timeout_s,
        "max_value_chars": _MAX_VALUE_CHARS,
    }
    total = min(max_total_s, 2.0 + timeout_s * (len(inputs) + 1))
    res = run_program(
        _DRIVER,
        args=[nonce],
        timeout_s=total,
        memory_mb=memory_mb,
        files={"solution.py": program, "tests.json": json.dumps(cfg)},
        max_output_bytes=64 * 1024 * 1024,
        file_size_mb=96,
        require=require,
    )
    load, statuses, values, error = _parse_results(res.stdout, nonce, len(inputs), res.truncated)
    if load == "crashed":
        error = f"sandbox {res.status}: {res.stderr[-500:]}"
    return _CallResults(load, statuses, values, res, error)


class _Forged(Exception):
    """The driver's result lines break its protocol: the program wrote some of them."""


_CALL_STATUSES = ("ok", "error", "timeout", "memory")
_LOAD_STATUSES = ("ok", "error", "timeout", "missing")


def _parse_results(stdout: str, nonce: str, n: int, truncated: bool) -> tuple[str, list[str], list[Any], str]:
    """``(load, statuses, values, error)`` from the driver's ``<nonce><json>`` lines.

    The program runs in the driver's interpreter, so it can learn the nonce and write such
    lines itself. The driver writes exactly one ``load`` record, then (when it is ``ok``) one
    record per input, in order; any other sequence, or a record that does not decode, means
    the lines were tampered with: ``load == "forged"`` and every test fails. A well-formed
    forged result can only claim a value the program could have returned (expected values
    never enter the sandbox). A line cut by the output cap ends the results instead."""
    statuses: list[str] = ["not_run"] * n
    values: list[Any] = [None] * n
    load, error, expect = "crashed", "", 0
    lines = [line for line in stdout.splitlines() if line.startswith(nonce)]
    try:
        for j, line in enumerate(lines):
            try:
                msg = json.loads(line[len(nonce):])
            except (ValueError, RecursionError) as e:
                if truncated and j == len(lines) - 1:
                    break  # cut by the output cap
                raise _Forged(f"undecodable result line ({type(e).__name__})") from None
            if not isinstance(msg, dict):
                raise _Forged("a result line is not an object")
            if load == "crashed":
                if msg.get("load") not in _LOAD_STATUSES:
                    raise _Forged("the first result line is not the program's load status")
                load, error = msg["load"], str(msg.get("error", ""))[:500]
                continue
            i, status = msg.get("i"), msg.get("status")
            if load != "ok" or type(i) is not int or i != expect or expect >= n or status not in _CALL_STATUSES:
                raise _Forged(f"result line {j} out of protocol (expected test {expect} of {n})")
            expect += 1
            statuses[i] = status
            if status == "ok":
                if "value" not in msg:
                    raise _Forged(f"test {i}: a result without a value")
                values[i] = _decode(msg["value"])
            elif not error:
                error = str(msg.get("error", status))[:500]
    except (_Forged, TypeError, ValueError, KeyError, AttributeError, RecursionError, OverflowError) as e:
        why = str(e) if isinstance(e, _Forged) else f"a result that does not decode ({type(e).__name__})"
        return "forged", ["forged"] * n, [None] * n, f"driver output forged or corrupted: {why}"
    return load, statuses, values, error


# --------------------------------------------------------------------------------------
# (a) stdin/stdout tests
# --------------------------------------------------------------------------------------
def grade_stdio(
    completion: str,
    tests: Sequence[Mapping[str, Any]],
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 1024,
    stop_on_failure: bool = False,
    extract: bool = True,
    require: Sequence[str] = (),
) -> CodeGrade:
    """Run the program once per test with ``input`` on stdin; a test passes when the
    normalised stdout equals the normalised ``output`` and the program exited with 0.

    ``stop_on_failure``: skip the remaining tests after the first failure (they count as
    failed, ``not_run``) — cheaper when only all-pass matters. ``require``: sandbox guards
    without which no program runs (:class:`disa.sandbox.SandboxUnavailable`).
    """
    code = extract_code(completion) if extract else completion
    total = len(tests)
    if total == 0:
        return CodeGrade(0, 0, [], error="no tests")
    if not code.strip():
        return CodeGrade(0, total, ["not_run"] * total, detail="no code")
    statuses: list[str] = []
    detail = ""
    guards: dict[str, bool] = {}
    for t in tests:
        if stop_on_failure and statuses and statuses[-1] != "passed":
            statuses.append("not_run")
            continue
        res = run_program(code, stdin=str(t.get("input", "")), timeout_s=timeout_s, memory_mb=memory_mb,
                          require=require)
        if res.status == "sandbox_error":
            return CodeGrade(0, total, statuses, error=res.stderr[-500:])
        guards = merge_guards(guards, res.guards)
        if res.status != "ok":
            statuses.append(res.status)
            why = res.stderr[-300:].strip() or (
                f"still running after {timeout_s} s: its process group was killed" if res.status == "timeout"
                else f"exit status {res.returncode}")
            detail = detail or f"{res.status}: {why}"
        elif normalize_output(res.stdout) == normalize_output(str(t.get("output", ""))):
            statuses.append("passed")
        else:
            statuses.append("wrong")
            detail = detail or f"wrong output: {res.stdout[:200]!r}"
    return CodeGrade(statuses.count("passed"), total, statuses, detail=detail, guards=guards)


def merge_guards(a: Mapping[str, bool], b: Mapping[str, bool]) -> dict[str, bool]:
    """The guards of two sets of runs: a guard holds for the union only where it held for
    both (an empty mapping is "no run", and leaves the other unchanged)."""
    if not a or not b:
        return dict(a or b)
    return {g: bool(a.get(g)) and bool(b.get(g)) for g in {*a, *b}}


# --------------------------------------------------------------------------------------
# (b) functional tests
# --------------------------------------------------------------------------------------
def _parse_args(raw: Any) -> list:
    if isinstance(raw, str):  # LiveCodeBench: one JSON value per line
        return [json.loads(line) for line in raw.split("\n") if line.strip()]
    if isinstance(raw, (list, tuple)):
        return list(raw)
    return [raw]


def _parse_expected(raw: Any) -> Any:
    return json.loads(raw) if isinstance(raw, str) else raw


def grade_functional(
    completion: str,
    fn_name: str,
    tests: Sequence[Mapping[str, Any]],
    *,
    timeout_s: float = 5.0,
    max_total_s: float = 120.0,
    memory_mb: int = 1024,
    atol: float = 0.0,
    extract: bool = True,
    require: Sequence[str] = (),
) -> CodeGrade:
    """Call ``fn_name`` (a function, or a method of ``class Solution``) on each test's
    ``input`` and compare with ``output`` (:func:`outputs_match`, tuples compared as lists
    since JSON has none). String inputs/outputs are JSON text (LiveCodeBench convention).
    ``timeout_s`` is per test; ``max_total_s`` bounds the whole run."""
    code = extract_code(completion) if extract else completion
    total = len(tests)
    if total == 0:
        return CodeGrade(0, 0, [], error="no tests")
    try:
        inputs = [_parse_args(t["input"]) for t in tests]
        expected = [_parse_expected(t["output"]) for t in tests]
    except (KeyError, json.JSONDecodeError) as e:
        return CodeGrade(0, total, [], error=f"malformed tests: {e!r}")
    if not code.strip():
        return CodeGrade(0, total, ["not_run"] * total, detail="no code")
    calls = _run_calls(
        code, fn_name, inputs, timeout_s=timeout_s, max_total_s=max_total_s, memory_mb=memory_mb, require=require
    )
    if calls.run.status == "sandbox_error":
        return CodeGrade(0, total, [], error=calls.run.stderr[-500:])
    return _score(calls, expected, atol, as_json=True)


def _score(
    calls: _CallResults, expected: Sequence[Any], atol: float, *, as_json: bool, check=None
) -> CodeGrade:
    total, guards = len(expected), calls.run.guards
    if calls.load == "forged":
        return CodeGrade(0, total, ["forged"] * total, detail=calls.error, guards=guards)
    if calls.load != "ok":
        return CodeGrade(0, total, [f"load_{calls.load}"] * total, detail=calls.error, guards=guards)
    statuses = []
    detail = calls.error
    for i, (st, val, exp) in enumerate(zip(calls.statuses, calls.values, expected)):
        if st != "ok":
            statuses.append(st)
            continue
        out = _lists_for_tuples(val) if as_json else val
        ok = check(i, val) if check is not None else outputs_match(out, exp, atol)
        statuses.append("passed" if ok else "wrong")
        if not ok and not detail:
            detail = f"test {i}: got {val!r:.200}, expected {exp!r:.200}"
    return CodeGrade(statuses.count("passed"), total, statuses, detail=detail, guards=guards)


# --------------------------------------------------------------------------------------
# (c) HumanEval+
# --------------------------------------------------------------------------------------
def _inputs_of(task: Mapping[str, Any], use_plus: bool) -> list[list]:
    out: list[list] = []
    for key in ("base_input", "plus_input") if use_plus else ("base_input",):
        raw = task.get(key)
        if raw is None:
            continue
        if isinstance(raw, str):
            raw = json.loads(raw)
        if hasattr(raw, "tolist"):
            raw = raw.tolist()
        out.extend(list(a) for a in raw)
    return out


def _prompt_of(task: Mapping[str, Any]) -> str:
    # Raw records have "prompt"; load_benchmark() rows have it as "problem".
    return str(task["prompt"] if "prompt" in task else task["problem"])


def _task_id(task: Mapping[str, Any]) -> str:
    return str(task.get("task_id") or task.get("prompt_id") or "")


def humaneval_program(task: Mapping[str, Any], code: str) -> str:
    """The program to test: the prompt (imports, helper functions, signature + docstring)
    followed by the code — which either redefines the entry point (a full function) or is
    the body that continues the prompt's signature."""
    prompt = _prompt_of(task)
    defines = re.search(rf"^def\s+{re.escape(str(task['entry_point']))}\s*\(", code, re.M)
    if defines:
        return prompt + "\n    pass\n\n" + code + "\n"
    return prompt + code + "\n"


_EXPECTED_CACHE: dict[tuple, list] = {}


def humaneval_expected(
    task: Mapping[str, Any],
    *,
    use_plus: bool = True,
    timeout_s: float = 10.0,
    memory_mb: int = 2048,
) -> list:
    """Expected outputs of a HumanEval+ task: the canonical solution's return values, run
    in the sandbox (cached per task in this process). Raises ``RuntimeError`` if the
    canonical solution fails on any input."""
    inputs = _inputs_of(task, use_plus)
    prompt = _prompt_of(task)
    key = (
        _task_id(task),
        prompt,
        str(task["canonical_solution"]),
        json.dumps(inputs, sort_keys=True, default=repr),
    )
    if key in _EXPECTED_CACHE:
        return _EXPECTED_CACHE[key]
    program = prompt + str(task["canonical_solution"]) + "\n"
    calls = _run_calls(
        program,
        str(task["entry_point"]),
        inputs,
        timeout_s=timeout_s,
        max_total_s=600.0,
        memory_mb=memory_mb,
    )
    bad = [i for i, s in enumerate(calls.statuses) if s != "ok"]
    if calls.load != "ok" or bad:
        raise RuntimeError(
            f"{_task_id(task)}: canonical solution failed (load {calls.load}, "
            f"inputs {bad[:10]}): {calls.error or calls.run.stderr[-300:]}"
        )
    _EXPECTED_CACHE[key] = calls.values
    return calls.values


def _poly(xs: Sequence[float], x: float) -> float:
    return sum(c * x**i for i, c in enumerate(xs))


def grade_humaneval(
    task: Mapping[str, Any],
    completion: str,
    *,
    use_plus: bool = True,
    timeout_s: float = 5.0,
    max_total_s: float = 120.0,
    memory_mb: int = 1024,
    expected: Sequence[Any] | None = None,
    extract: bool = True,
    require: Sequence[str] = (),
) -> CodeGrade:
    """Grade a completion on a HumanEval(+) task: base inputs, plus the ``plus_input`` ones
    when ``use_plus``. ``expected`` (from :func:`humaneval_expected`) may be passed in to
    avoid recomputing it."""
    inputs = _inputs_of(task, use_plus)
    total = len(inputs)
    if expected is None:
        try:
            expected = humaneval_expected(task, use_plus=use_plus)
        except (RuntimeError, KeyError, ValueError) as e:
            return CodeGrade(0, total, [], error=str(e))
    code = extract_code(completion) if extract else completion
    if not code.strip():
        return CodeGrade(0, total, ["not_run"] * total, detail="no code")
    atol = float(task.get("atol") or 0.0)
    program = humaneval_program(task, code)
    calls = _run_calls(
        program,
        str(task["entry_point"]),
        inputs,
        timeout_s=timeout_s,
        max_total_s=max_total_s,
        memory_mb=memory_mb,
        require=require,
    )
    if calls.run.status == "sandbox_error":
        return CodeGrade(0, total, [], error=calls.run.stderr[-500:])
    check = None
    if task.get("entry_point") == "find_zero":
        # Any root is right (EvalPlus checks |poly(xs, x)| <= atol, not x itself).
        def check(i: int, value: Any) -> bool:
            try:
                return (
                    isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    and (abs(_poly(inputs[i][0], value)) <= (atol or 1e-6))
                )
            except (OverflowError, TypeError, IndexError):
                return False

    return _score(calls, expected, atol, as_json=False, check=check)


# --------------------------------------------------------------------------------------
# many at once
# --------------------------------------------------------------------------------------
def _fn_name_of(problem: Mapping[str, Any]) -> str | None:
    if problem.get("fn_name"):
        return str(problem["fn_name"])
    meta = problem.get("metadata")
    tests = problem.get("tests") or []
    if not meta and tests and isinstance(tests[0], Mapping):
        meta = tests[0].get("metadata")
        if tests[0].get("fn_name"):
            return str(tests[0]["fn_name"])
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            meta = None
    if isinstance(meta, Mapping) and meta.get("func_name"):
        return str(meta["func_name"])
    return None


def problem_kind(problem: Mapping[str, Any]) -> str:
    """``humaneval``, ``functional`` or ``stdio`` for a problem record."""
    if "entry_point" in problem and "canonical_solution" in problem:
        return "humaneval"
    return "functional" if _fn_name_of(problem) else "stdio"


def grade_many(
    problems: Sequence[Mapping[str, Any]] | Any,
    completions: Sequence[str],
    *,
    kind: str = "auto",
    workers: int | None = None,
    **kwargs: Any,
) -> list[CodeGrade]:
    """Grade ``completions[i]`` on ``problems[i]`` in parallel.

    ``problems``: records (or a DataFrame) — HumanEval+ tasks, or ``{"tests": [...]}`` with
    a function name in ``fn_name`` / LiveCodeBench ``metadata.func_name`` for functional
    tests. ``kind``: ``auto`` (per problem, :func:`problem_kind`), ``stdio``, ``functional``
    or ``humaneval``. ``workers``: parallel sandboxes (default: CPU count). Threads suffice:
    each only waits on its sandbox subprocess. ``kwargs`` go to the per-kind graders.
    """
    if hasattr(problems, "to_dict"):
        problems = problems.to_dict(orient="records")
    problems = list(problems)
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    workers = max(1, int(workers or os.cpu_count() or 1))
    kinds = [problem_kind(p) if kind == "auto" else kind for p in problems]

    # HumanEval+: expected outputs once per distinct task, before grading.
    expected: dict[int, list | Exception] = {}
    use_plus = kwargs.get("use_plus", True)
    he = {}
    for p, k in zip(problems, kinds):
        if k == "humaneval":
            he.setdefault(_task_id(p) or str(id(p)), p)

    def _exp(p: Mapping[str, Any]) -> list | Exception:
        try:
            return humaneval_expected(p, use_plus=use_plus)
        except Exception as e:  # recorded per item as a grading failure
            return e

    with ThreadPoolExecutor(max_workers=workers) as pool:
        by_task = dict(zip(he, pool.map(_exp, he.values())))
        for i, (p, k) in enumerate(zip(problems, kinds)):
            if k == "humaneval":
                expected[i] = by_task[_task_id(p) or str(id(p))]

        def one(i: int) -> CodeGrade:
            p, c, k = problems[i], completions[i], kinds[i]
            if k == "humaneval":
                exp = expected[i]
                if isinstance(exp, Exception):
                    return CodeGrade(0, 0, [], error=str(exp))
                return grade_humaneval(p, c, expected=exp, **_only(kwargs, _HUMANEVAL_KW))
            tests = p.get("tests")
            if isinstance(tests, str):
                tests = json.loads(tests)
            if k == "functional":
                fn = _fn_name_of(p)
                if fn is None:
                    return CodeGrade(0, 0, [], error="functional tests without a function name")
                return grade_functional(c, fn, tests or [], **_only(kwargs, _FUNCTIONAL_KW))
            if k == "stdio":
                return grade_stdio(c, tests or [], **_only(kwargs, _STDIO_KW))
            raise ValueError(f"kind={k!r}; allowed: auto, stdio, functional, humaneval")

        return list(pool.map(one, range(len(problems))))


_STDIO_KW = ("timeout_s", "memory_mb", "stop_on_failure", "extract", "require")
_FUNCTIONAL_KW = ("timeout_s", "max_total_s", "memory_mb", "atol", "extract", "require")
_HUMANEVAL_KW = ("use_plus", "timeout_s", "max_total_s", "memory_mb", "extract", "require")


def missing_sandbox_guards() -> list[str]:
    """The sandbox guards (:data:`disa.sandbox.GUARDS`) this machine cannot give a program."""
    from disa.sandbox import missing_guards

    return missing_guards()


def _only(kwargs: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k in keys}
