"""Code rewards: run a completion's program against tests in the sandbox
(:mod:`disa.sandbox`) and report the fraction of tests passed.

Three kinds of tests, each compared as the evaluator it is usually scored with compares
(README, "How grading works"):

* **stdin/stdout** (LiveCodeBench "stdin", CodeForces): ``[{"input": str, "output": str}]``;
  one sandboxed run per test; a test passes when the program exits with 0 and its output
  equals the expected one under :func:`outputs_equal`: ``"lines"``, LiveCodeBench's rule
  (``lcb_runner/evaluation/testing_util.py``, ``grade_stdio``), or ``"tokens"``, the rule of
  Codeforces's checkers (whitespace-separated tokens, real numbers within an absolute or
  relative tolerance, YES/NO in any case).
* **functional** (LiveCodeBench "functional", LeetCode style): call a named function (or a
  method of ``class Solution``) with arguments; ``[{"input": args, "output": value}]`` where
  ``args`` is a list, or LiveCodeBench's text with one JSON value per line, and ``output``
  is a value or its JSON text. Compared as LiveCodeBench does (``grade_call_based``): equal,
  with a returned tuple read as a list; no float tolerance.
* **HumanEval+** (either public layout, :mod:`disa.tasks.code_layouts`): expected outputs are
  OriginFmt's ``results`` or the canonical solution's return values (run in the sandbox),
  compared by evalplus's rules (:func:`evalplus_equal`, ``find_zero`` by the polynomial's
  value), each input under evalplus's time limit: ``max(min_time_limit_s,
  time_limit_factor × the canonical solution's time on it)`` (``evalplus/eval/__init__.py``
  ``untrusted_check``; factor 4 and floor 4 s in ``evalplus/config.py``).

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
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from disa.sandbox import ExecResult, run_program
from disa.tasks.code_layouts import PRELUDES, functional_name, humaneval_row

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "EVALPLUS_MIN_TIME_LIMIT_S",
    "EVALPLUS_TIME_LIMIT_FACTOR",
    "CodeGrade",
    "evalplus_equal",
    "evalplus_time_limits",
    "extract_code",
    "grade_functional",
    "grade_humaneval",
    "grade_many",
    "grade_stdio",
    "humaneval_expected",
    "humaneval_program",
    "merge_guards",
    "missing_sandbox_guards",
    "outputs_equal",
    "problem_kind",
    "values_equal",
]

#: Seconds per stdin/stdout test or functional call when neither the config nor the benchmark
#: gives a limit: LiveCodeBench's default (``lcb_runner/runner/parser.py``, ``--timeout 6``).
DEFAULT_TIMEOUT_S = 6.0
#: MiB for a program and all its processes when neither the config nor the benchmark gives one.
DEFAULT_MEMORY_MB = 1024
#: evalplus's time limit per input: ``max(floor, factor × the canonical solution's time)``
#: (``evalplus/config.py``: ``DEFAULT_GT_TIME_LIMIT_FACTOR = 4.0``, ``DEFAULT_MIN_TIME_LIMIT =
#: 4.0`` since April 2025, 1.0 before), and at most ``EVALPLUS_TASK_CAP_S`` for the base or the
#: plus inputs together (``EVALPLUS_TIMEOUT_PER_TASK``, default 60) plus 2 s.
EVALPLUS_TIME_LIMIT_FACTOR = 4.0
EVALPLUS_MIN_TIME_LIMIT_S = 4.0
EVALPLUS_TASK_CAP_S = 60.0


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


# stdin/stdout: LiveCodeBench's "lines" and Codeforces-checker "tokens"
def _stripped_lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().split("\n")]


def _decimals(line: str) -> list[Decimal] | None:
    try:
        return [Decimal(token) for token in line.split()]
    except (InvalidOperation, ValueError):
        return None


_REAL = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?")
_YES_NO = ("yes", "no")


def _tokens_equal(out: str, exp: str, tolerance: float) -> bool:
    if out == exp:
        return True
    if exp.lower() in _YES_NO:
        return out.lower() == exp.lower()
    # real numbers: one of the two written with a point or an exponent (two integers are
    # compared as text, as testlib's wcmp does)
    if _REAL.fullmatch(exp) and _REAL.fullmatch(out) and any(c in out + exp for c in ".eE"):
        a, b = float(out), float(exp)
        return abs(a - b) <= tolerance or abs(a - b) <= tolerance * abs(b)
    return False


def outputs_equal(
    out: str, exp: str, compare: str = "tokens", float_tolerance: float = 1e-6
) -> bool:
    """Whether a program's stdout ``out`` matches the expected output ``exp``.

    ``"lines"``: LiveCodeBench's rule (``grade_stdio``): both texts stripped and split at
    newlines, each line stripped; the same number of lines, and each line equal as text or,
    token by token, as decimals (``Decimal("1.50") == Decimal("1.5")``; no tolerance, no case
    folding). ``"tokens"``: the rule of Codeforces's checkers (testlib ``wcmp``, ``rcmp``,
    ``yesno``): the same whitespace-separated tokens, line breaks aside; a token that the
    expected output writes as YES or NO matches in any case; real numbers (one of the two
    written with a point or an exponent) match within ``float_tolerance``, absolute or
    relative to the expected; integers and other text only exactly.
    """
    if compare == "lines":
        got, want = _stripped_lines(out), _stripped_lines(exp)
        if len(got) != len(want):
            return False
        for a, b in zip(got, want):
            if a != b and (_decimals(a) is None or _decimals(a) != _decimals(b)):
                return False
        return True
    if compare == "tokens":
        got, want = out.split(), exp.split()
        return len(got) == len(want) and all(
            _tokens_equal(a, b, float_tolerance) for a, b in zip(got, want)
        )
    raise ValueError(f"compare={compare!r}; allowed: ['tokens', 'lines']")


# functional: LiveCodeBench's grade_call_based
def _lists_for_tuples(x: Any) -> Any:
    """JSON has no tuples: compare a returned tuple with an expected JSON list."""
    if isinstance(x, (list, tuple)):
        return [_lists_for_tuples(v) for v in x]
    if isinstance(x, dict):
        return {k: _lists_for_tuples(v) for k, v in x.items()}
    return x


def values_equal(out: Any, exp: Any) -> bool:
    """A functional test's returned value against the expected one, as LiveCodeBench compares
    them (``grade_call_based``: ``prediction == gt_out``, tuples as lists): exact, with no
    float tolerance. A comparison that raises is a mismatch."""
    try:
        return bool(_lists_for_tuples(out) == exp)
    except Exception:
        return False


# HumanEval+: evalplus's rules (evalplus/eval/__init__.py, unsafe_execute)
def _is_floats(x: Any) -> bool:
    """evalplus's ``is_floats``: a float, or a non-empty list/tuple of floats only."""
    if isinstance(x, float):
        return True
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(i, float) for i in x)


def evalplus_equal(out: Any, exp: Any, atol: float) -> tuple[bool, float]:
    """``(passed, atol)`` for one HumanEval+ input, as evalplus's ``unsafe_execute`` decides:
    equal by ``==``; else, when ``atol`` is set or the expected value is a float (or a list or
    tuple of floats only; then ``atol`` becomes 1e-6), the same type (and length) and
    ``np.allclose(out, exp, rtol=1e-7, atol=atol)``. The returned ``atol`` is the one evalplus
    carries on to the task's later inputs: once a float expected value has switched the
    tolerance on, it stays on."""
    try:
        exact = bool(out == exp)
    except Exception:
        exact = False
    if atol == 0 and _is_floats(exp):
        atol = 1e-6
    if exact or atol == 0:
        return exact, atol
    try:
        if type(out) is not type(exp) or (isinstance(exp, (list, tuple)) and len(out) != len(exp)):
            return False, atol
        return bool(np.allclose(out, exp, rtol=1e-07, atol=atol)), atol
    except Exception:
        return False, atol


def _poly(xs: Sequence[float], x: float) -> float:
    """evalplus's ``_poly`` (``evalplus/eval/_special_oracle.py``): the polynomial's value."""
    return sum(coeff * math.pow(x, i) for i, coeff in enumerate(xs))


def _find_zero_ok(xs: Any, out: Any, atol: float) -> bool:
    """evalplus's oracle for HumanEval/32 (``find_zero``): any root will do,
    ``|poly(xs, out)| <= atol``."""
    try:
        return bool(abs(_poly(xs, out)) <= atol)
    except Exception:
        return False


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
    load: str  # ok | error | timeout | missing | crashed | forged
    statuses: list[str]  # per input: ok | error | timeout | memory | not_run | forged
    values: list[Any]
    run: ExecResult
    error: str = ""
    seconds: list[float | None] = field(default_factory=list)  # each call's time (driver's clock)


def _run_calls(
    program: str,
    fn_name: str,
    inputs: Sequence[Sequence[Any]],
    *,
    timeouts: Sequence[float],
    max_total_s: float,
    memory_mb: int,
    require: Sequence[str] = (),
) -> _CallResults:
    """Run ``program`` in the sandbox and call ``fn_name(*args)`` for each input, input ``i``
    under ``timeouts[i]`` seconds; the whole run under ``max_total_s``."""
    nonce = secrets.token_hex(8)
    cfg = {
        "fn_name": fn_name,
        "inputs": [list(a) for a in inputs],
        "timeouts": [float(t) for t in timeouts],
        "load_timeout": max(timeouts, default=DEFAULT_TIMEOUT_S),
        "max_value_chars": _MAX_VALUE_CHARS,
    }
    total = min(max_total_s, 2.0 + sum(timeouts) + cfg["load_timeout"])
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
    parsed = _parse_results(res.stdout, nonce, len(inputs), res.truncated)
    error = (
        f"sandbox {res.status}: {res.stderr[-500:]}" if parsed.load == "crashed" else parsed.error
    )
    return _CallResults(parsed.load, parsed.statuses, parsed.values, res, error, parsed.seconds)


class _Forged(Exception):
    """The driver's result lines break its protocol: the program wrote some of them."""


_CALL_STATUSES = ("ok", "error", "timeout", "memory")
_LOAD_STATUSES = ("ok", "error", "timeout", "missing")


class _Parsed(NamedTuple):
    load: str
    statuses: list[str]
    values: list[Any]
    error: str
    seconds: list[float | None]


def _parse_results(stdout: str, nonce: str, n: int, truncated: bool) -> _Parsed:
    """``(load, statuses, values, error, seconds)`` from the driver's ``<nonce><json>`` lines.

    The program runs in the driver's interpreter, so it can learn the nonce and write such
    lines itself. The driver writes exactly one ``load`` record, then (when it is ``ok``) one
    record per input, in order; any other sequence, or a record that does not decode, means
    the lines were tampered with: ``load == "forged"`` and every test fails. A well-formed
    forged result can only claim a value the program could have returned (expected values
    never enter the sandbox). A line cut by the output cap ends the results instead."""
    statuses: list[str] = ["not_run"] * n
    values: list[Any] = [None] * n
    seconds: list[float | None] = [None] * n
    load, error, expect = "crashed", "", 0
    lines = [line for line in stdout.splitlines() if line.startswith(nonce)]
    try:
        for j, line in enumerate(lines):
            try:
                msg = json.loads(line[len(nonce) :])
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
            if (
                load != "ok"
                or type(i) is not int
                or i != expect
                or expect >= n
                or status not in _CALL_STATUSES
            ):
                raise _Forged(f"result line {j} out of protocol (expected test {expect} of {n})")
            expect += 1
            statuses[i] = status
            if status == "ok":
                if "value" not in msg:
                    raise _Forged(f"test {i}: a result without a value")
                values[i] = _decode(msg["value"])
                t = msg.get("t")
                seconds[i] = (
                    float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else None
                )
            elif not error:
                error = str(msg.get("error", status))[:500]
    except (
        _Forged,
        TypeError,
        ValueError,
        KeyError,
        AttributeError,
        RecursionError,
        OverflowError,
    ) as e:
        why = (
            str(e)
            if isinstance(e, _Forged)
            else f"a result that does not decode ({type(e).__name__})"
        )
        return _Parsed(
            "forged",
            ["forged"] * n,
            [None] * n,
            f"driver output forged or corrupted: {why}",
            [None] * n,
        )
    return _Parsed(load, statuses, values, error, seconds)


# --------------------------------------------------------------------------------------
# (a) stdin/stdout tests
# --------------------------------------------------------------------------------------
def _with_prelude(code: str, prelude: str | None) -> str:
    return f"{PRELUDES[prelude]}\n{code}" if prelude else code


def grade_stdio(
    completion: str,
    tests: Sequence[Mapping[str, Any]],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
    compare: str = "tokens",
    float_tolerance: float = 1e-6,
    prelude: str | None = None,
    stop_on_failure: bool = False,
    extract: bool = True,
    require: Sequence[str] = (),
) -> CodeGrade:
    """Run the program once per test with ``input`` on stdin; a test passes when the program
    exits with 0 within ``timeout_s`` and its stdout matches ``output`` under
    :func:`outputs_equal` (``compare``, ``float_tolerance``).

    ``prelude``: a name of :data:`disa.tasks.code_layouts.PRELUDES`, code put before the
    program (LiveCodeBench's imports). ``stop_on_failure``: skip the remaining tests after
    the first failure (they count as failed, ``not_run``) — cheaper when only all-pass
    matters. ``require``: sandbox guards without which no program runs
    (:class:`disa.sandbox.SandboxUnavailable`).
    """
    code = extract_code(completion) if extract else completion
    total = len(tests)
    if total == 0:
        return CodeGrade(0, 0, [], error="no tests")
    if not code.strip():
        return CodeGrade(0, total, ["not_run"] * total, detail="no code")
    program = _with_prelude(code, prelude)
    statuses: list[str] = []
    detail = ""
    guards: dict[str, bool] = {}
    for t in tests:
        if stop_on_failure and statuses and statuses[-1] != "passed":
            statuses.append("not_run")
            continue
        res = run_program(
            program,
            stdin=str(t.get("input", "")),
            timeout_s=timeout_s,
            memory_mb=memory_mb,
            require=require,
        )
        if res.status == "sandbox_error":
            return CodeGrade(0, total, statuses, error=res.stderr[-500:])
        guards = merge_guards(guards, res.guards)
        if res.status != "ok":
            statuses.append(res.status)
            why = res.stderr[-300:].strip() or (
                f"still running after {timeout_s} s: its process group was killed"
                if res.status == "timeout"
                else f"exit status {res.returncode}"
            )
            detail = detail or f"{res.status}: {why}"
        elif outputs_equal(res.stdout, str(t.get("output", "")), compare, float_tolerance):
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
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_total_s: float = 120.0,
    memory_mb: int = DEFAULT_MEMORY_MB,
    prelude: str | None = None,
    extract: bool = True,
    require: Sequence[str] = (),
) -> CodeGrade:
    """Call ``fn_name`` (a function, or a method of ``class Solution``) on each test's
    ``input`` and compare with ``output`` (:func:`values_equal`: exact, a returned tuple read
    as a list). String inputs/outputs are JSON text (LiveCodeBench convention).
    ``timeout_s`` is per test; ``max_total_s`` bounds the whole run; ``prelude`` as for
    :func:`grade_stdio`."""
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
        _with_prelude(code, prelude),
        fn_name,
        inputs,
        timeouts=[timeout_s] * total,
        max_total_s=max_total_s,
        memory_mb=memory_mb,
        require=require,
    )
    if calls.run.status == "sandbox_error":
        return CodeGrade(0, total, [], error=calls.run.stderr[-500:])
    return _score(calls, [lambda i, v, e=e: values_equal(v, e) for e in expected], expected)


def _score(calls: _CallResults, checks: Sequence[Any], expected: Sequence[Any]) -> CodeGrade:
    """The grade of a driver run: test ``i`` passes when its call returned and
    ``checks[i](i, value)`` holds."""
    total, guards = len(checks), calls.run.guards
    if calls.load == "forged":
        return CodeGrade(0, total, ["forged"] * total, detail=calls.error, guards=guards)
    if calls.load != "ok":
        return CodeGrade(
            0, total, [f"load_{calls.load}"] * total, detail=calls.error, guards=guards
        )
    statuses = []
    detail = calls.error
    for i, (st, val, check) in enumerate(zip(calls.statuses, calls.values, checks)):
        if st != "ok":
            statuses.append(st)
            continue
        ok = check(i, val)
        statuses.append("passed" if ok else "wrong")
        if not ok and not detail:
            detail = f"test {i}: got {val!r:.200}, expected {expected[i]!r:.200}"
    return CodeGrade(statuses.count("passed"), total, statuses, detail=detail, guards=guards)


# --------------------------------------------------------------------------------------
# (c) HumanEval+
# --------------------------------------------------------------------------------------
def _he_row(task: Mapping[str, Any]) -> Mapping[str, Any]:
    """A HumanEval+ task as a uniform row: a :func:`~disa.tasks.benchmarks.load_benchmark` row
    as it is, a raw record of either public layout through
    :func:`~disa.tasks.code_layouts.humaneval_row`."""
    if "expected" in task and "base_input" in task:
        return task
    return {**task, **humaneval_row(task)}


def _parts(task: Mapping[str, Any], use_plus: bool) -> list[list[list]]:
    """The task's inputs as evalplus runs them: the base inputs, then the plus inputs."""
    parts = []
    for key in ("base_input", "plus_input") if use_plus else ("base_input",):
        raw = task.get(key)
        if isinstance(raw, str):
            raw = json.loads(raw)
        if hasattr(raw, "tolist"):
            raw = raw.tolist()
        parts.append([list(a) for a in (raw or [])])
    return parts


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


class Reference(NamedTuple):
    """A HumanEval+ task's expected values and the canonical solution's time per input."""

    expected: list
    seconds: list[float]


_REFERENCE_CACHE: dict[tuple, Reference] = {}


def humaneval_expected(
    task: Mapping[str, Any],
    *,
    use_plus: bool = True,
    timeout_s: float = 10.0,
    memory_mb: int = 2048,
) -> Reference:
    """The expected outputs of a HumanEval+ task (OriginFmt's ``results`` when the row has
    them, else the canonical solution's return values) and the canonical solution's time on
    each input (for evalplus's time limits), from one run of the canonical solution in the
    sandbox; cached per task in this process. Raises ``RuntimeError`` if the canonical
    solution fails on any input."""
    task = _he_row(task)
    inputs = [a for part in _parts(task, use_plus) for a in part]
    prompt = _prompt_of(task)
    given = task.get("expected")
    key = (
        _task_id(task),
        prompt,
        str(task["canonical_solution"]),
        json.dumps([inputs, given], sort_keys=True, default=repr),
    )
    if key in _REFERENCE_CACHE:
        return _REFERENCE_CACHE[key]
    program = prompt + str(task["canonical_solution"]) + "\n"
    calls = _run_calls(
        program,
        str(task["entry_point"]),
        inputs,
        timeouts=[timeout_s] * len(inputs),
        max_total_s=600.0,
        memory_mb=memory_mb,
    )
    bad = [i for i, s in enumerate(calls.statuses) if s != "ok"]
    if calls.load != "ok" or bad:
        raise RuntimeError(
            f"{_task_id(task)}: canonical solution failed (load {calls.load}, "
            f"inputs {bad[:10]}): {calls.error or calls.run.stderr[-300:]}"
        )
    expected = list(given)[: len(inputs)] if given is not None else calls.values
    ref = Reference(expected, [float(t or 0.0) for t in calls.seconds])
    _REFERENCE_CACHE[key] = ref
    return ref


def evalplus_time_limits(
    seconds: Sequence[float],
    *,
    factor: float = EVALPLUS_TIME_LIMIT_FACTOR,
    floor_s: float = EVALPLUS_MIN_TIME_LIMIT_S,
) -> list[float]:
    """evalplus's time limit of each input: ``max(floor_s, factor × t)`` with ``t`` the
    canonical solution's time on it (``evalplus/eval/__init__.py``, ``untrusted_check``)."""
    return [max(floor_s, factor * t) for t in seconds]


def grade_humaneval(
    task: Mapping[str, Any],
    completion: str,
    *,
    use_plus: bool = True,
    timeout_s: float | None = None,
    time_limit_factor: float = EVALPLUS_TIME_LIMIT_FACTOR,
    min_time_limit_s: float = EVALPLUS_MIN_TIME_LIMIT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
    expected: Reference | None = None,
    extract: bool = True,
    require: Sequence[str] = (),
) -> CodeGrade:
    """Grade a completion on a HumanEval(+) task (a raw record of either public layout, or a
    :func:`~disa.tasks.benchmarks.load_benchmark` row): base inputs, plus the ``plus_input``
    ones when ``use_plus``, compared by :func:`evalplus_equal` (``find_zero``: any root).

    Each input runs under evalplus's time limit (:func:`evalplus_time_limits` with
    ``time_limit_factor`` and ``min_time_limit_s``), or under ``timeout_s`` when one is given
    (a config's ``task.grader.timeout_s``). ``expected`` (from :func:`humaneval_expected`)
    may be passed in to avoid recomputing it."""
    task = _he_row(task)
    parts = _parts(task, use_plus)
    inputs = [a for part in parts for a in part]
    total = len(inputs)
    if expected is None:
        try:
            expected = humaneval_expected(task, use_plus=use_plus)
        except (RuntimeError, KeyError, ValueError) as e:
            return CodeGrade(0, total, [], error=str(e))
    code = extract_code(completion) if extract else completion
    if not code.strip():
        return CodeGrade(0, total, ["not_run"] * total, detail="no code")
    if timeout_s is not None:
        limits = [float(timeout_s)] * total
    else:
        limits = evalplus_time_limits(
            expected.seconds, factor=time_limit_factor, floor_s=min_time_limit_s
        )
    sizes = [len(part) for part in parts]
    # evalplus runs the base and the plus inputs as two checks, each capped at 60 s (+ 2 s)
    offsets = np.cumsum([0, *sizes])
    budget = sum(
        min(EVALPLUS_TASK_CAP_S, sum(limits[a:b])) + 2.0 for a, b in zip(offsets[:-1], offsets[1:])
    )
    calls = _run_calls(
        humaneval_program(task, code),
        str(task["entry_point"]),
        inputs,
        timeouts=limits,
        max_total_s=budget,
        memory_mb=memory_mb,
        require=require,
    )
    if calls.run.status == "sandbox_error":
        return CodeGrade(0, total, [], error=calls.run.stderr[-500:])
    task_atol = float(task.get("atol") or 0.0)
    if task.get("entry_point") == "find_zero":
        checks = [lambda i, v: _find_zero_ok(inputs[i][0], v, task_atol)] * total
    else:
        # evalplus's tolerance, once a float expected value switches it on, stays on for the
        # later inputs of the same check (base, plus): replayed here in input order
        state = {"atol": task_atol}
        starts = set(offsets[:-1].tolist())

        def check(i: int, value: Any) -> bool:
            if i in starts:
                state["atol"] = task_atol
            ok, state["atol"] = evalplus_equal(value, expected.expected[i], state["atol"])
            return ok

        checks = [check] * total
    return _score(calls, checks, expected.expected)


# --------------------------------------------------------------------------------------
# many at once
# --------------------------------------------------------------------------------------
def _fn_name_of(problem: Mapping[str, Any]) -> str | None:
    name = problem.get("fn_name")
    if isinstance(name, str) and name:  # a DataFrame row holds NaN where there is none
        return name
    tests = problem.get("tests")
    if isinstance(tests, str):
        tests = json.loads(tests)
    return functional_name(list(tests or []), problem.get("metadata"), problem.get("starter_code"))


def problem_kind(problem: Mapping[str, Any]) -> str:
    """``humaneval``, ``functional`` or ``stdio`` for a problem record."""
    # a DataFrame of several benchmarks holds NaN in the columns a row's layout lacks
    if isinstance(problem.get("entry_point"), str) and isinstance(
        problem.get("canonical_solution"), str
    ):
        return "humaneval"
    return "functional" if _fn_name_of(problem) else "stdio"


def _limit(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and x > 0 else None


def grade_many(
    problems: Sequence[Mapping[str, Any]] | Any,
    completions: Sequence[str],
    *,
    kind: str = "auto",
    workers: int | None = None,
    timeout_s: float | None = None,
    memory_mb: int | None = None,
    **kwargs: Any,
) -> list[CodeGrade]:
    """Grade ``completions[i]`` on ``problems[i]`` in parallel.

    ``problems``: records (or a DataFrame, e.g. from
    :func:`~disa.tasks.benchmarks.load_benchmark`) — HumanEval+ tasks, or ``{"tests": [...]}``
    with a function name in ``fn_name`` / LiveCodeBench ``metadata.func_name`` for functional
    tests. ``kind``: ``auto`` (per problem, :func:`problem_kind`), ``stdio``, ``functional``
    or ``humaneval``. ``workers``: parallel sandboxes (default: CPU count). Threads suffice:
    each only waits on its sandbox subprocess.

    Limits: ``timeout_s`` and ``memory_mb`` when given (a config's ``task.grader``) apply to
    every problem; else each problem's own (``time_limit_s``, ``memory_limit_mb`` columns,
    e.g. from a CodeForces statement); else :data:`DEFAULT_TIMEOUT_S` per test (HumanEval+:
    evalplus's time rule) and :data:`DEFAULT_MEMORY_MB`. A row's ``output_compare``,
    ``float_tolerance`` and ``prelude`` choose how its stdin/stdout outputs are compared and
    what precedes its program. ``kwargs`` go to the per-kind graders.
    """
    if hasattr(problems, "to_dict"):
        problems = problems.to_dict(orient="records")
    problems = list(problems)
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    workers = max(1, int(workers or os.cpu_count() or 1))
    kinds = [problem_kind(p) if kind == "auto" else kind for p in problems]

    # HumanEval+: expected outputs and canonical times once per distinct task, before grading.
    use_plus = kwargs.get("use_plus", True)
    he = {}
    for p, k in zip(problems, kinds):
        if k == "humaneval":
            he.setdefault(_task_id(p) or str(id(p)), p)

    def _exp(p: Mapping[str, Any]) -> Reference | Exception:
        try:
            return humaneval_expected(p, use_plus=use_plus)
        except Exception as e:  # recorded per item as a grading failure
            return e

    def limits(p: Mapping[str, Any], k: str) -> dict[str, Any]:
        time_s = timeout_s if timeout_s is not None else _limit(p.get("time_limit_s"))
        mem = memory_mb if memory_mb is not None else _limit(p.get("memory_limit_mb"))
        out: dict[str, Any] = {"memory_mb": int(mem) if mem else DEFAULT_MEMORY_MB}
        if time_s is not None or k != "humaneval":
            out["timeout_s"] = float(time_s or DEFAULT_TIMEOUT_S)
        return out

    with ThreadPoolExecutor(max_workers=workers) as pool:
        by_task = dict(zip(he, pool.map(_exp, he.values())))

        def one(i: int) -> CodeGrade:
            p, c, k = problems[i], completions[i], kinds[i]
            lim = limits(p, k)
            if k == "humaneval":
                exp = by_task[_task_id(p) or str(id(p))]
                if isinstance(exp, Exception):
                    return CodeGrade(0, 0, [], error=str(exp))
                return grade_humaneval(p, c, expected=exp, **lim, **_only(kwargs, _HUMANEVAL_KW))
            tests = p.get("tests")
            if isinstance(tests, str):
                tests = json.loads(tests)
            prelude = p.get("prelude") if isinstance(p.get("prelude"), str) else None
            if k == "functional":
                fn = _fn_name_of(p)
                if fn is None:
                    return CodeGrade(0, 0, [], error="functional tests without a function name")
                return grade_functional(
                    c, fn, tests or [], prelude=prelude, **lim, **_only(kwargs, _FUNCTIONAL_KW)
                )
            if k == "stdio":
                compare = (
                    p.get("output_compare")
                    if isinstance(p.get("output_compare"), str)
                    else "tokens"
                )
                tol = p.get("float_tolerance")
                tol = (
                    float(tol)
                    if isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0
                    else 1e-6
                )
                return grade_stdio(
                    c,
                    tests or [],
                    compare=compare,
                    float_tolerance=tol,
                    prelude=prelude,
                    **lim,
                    **_only(kwargs, _STDIO_KW),
                )
            raise ValueError(f"kind={k!r}; allowed: auto, stdio, functional, humaneval")

        return list(pool.map(one, range(len(problems))))


_STDIO_KW = ("stop_on_failure", "extract", "require")
_FUNCTIONAL_KW = ("max_total_s", "extract", "require")
_HUMANEVAL_KW = ("use_plus", "time_limit_factor", "min_time_limit_s", "extract", "require")


def missing_sandbox_guards() -> list[str]:
    """The sandbox guards (:data:`disa.sandbox.GUARDS`) this machine cannot give a program."""
    from disa.sandbox import missing_guards

    return missing_guards()


def _only(kwargs: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k in keys}
