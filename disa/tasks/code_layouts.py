"""The public layouts of the code benchmarks, read into the harness's uniform rows.

**HumanEval+** is published in two layouts, both with ``task_id``, ``prompt``,
``entry_point`` and ``canonical_solution``:

* the evalplus *release* (``HumanEvalPlus.jsonl`` and its ``-Mini`` cut): ``base_input``,
  ``plus_input`` (lists of argument lists) and ``atol``; the expected outputs are the
  canonical solution's return values;
* *OriginFmt* (evalplus ``tools/humaneval/to_original_fmt.py``, the Hugging Face
  ``evalplus/humanevalplus`` dataset): a self-contained ``test`` program whose
  ``check(candidate)`` holds ``inputs = [...]`` and ``results = [...]`` (base and plus inputs
  merged, duplicates dropped) and passes the tolerance as the last argument of
  ``assertion(candidate(*inp), exp, atol)`` (``find_zero``: ``... <= atol``). Six tasks with
  large outputs (``tri``, ``all_prefixes``, ...) carry no ``results`` and compare with a
  ``ref_func`` instead: their expected values come from the canonical solution.

The test program is read with :mod:`ast` only, never executed: literals are evaluated by
``ast.literal_eval`` (with ``inf``/``nan`` names, as ``repr`` writes them, allowed).

**LiveCodeBench and CodeForces in the rllm json layout** (a JSON list of ``problem``,
``tests`` = ``[{input, output, testtype?, metadata?}]``, LiveCodeBench also
``starter_code``) are tests-field layouts; :func:`functional_name` finds the function of
LiveCodeBench's functional problems (its ``metadata.func_name``, or the method that the
starter code declares), and :func:`statement_limits` the time and memory limits a
CodeForces statement states (``Time Limit: 2000 ms``, ``Memory Limit: 256 MB``).
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "LIVECODEBENCH_PRELUDE",
    "PRELUDES",
    "TestCodeError",
    "functional_name",
    "humaneval_row",
    "parse_originfmt_test",
    "statement_limits",
    "usable_tests",
]


#: The standard-library imports LiveCodeBench's grader puts before every program
#: (``lcb_runner/evaluation/testing_util.py``, ``import_string``), so that a solution may use
#: ``List``, ``deque``, ``gcd``... without importing them, as its starter code does.
LIVECODEBENCH_PRELUDE = (
    "from string import *\nfrom re import *\nfrom datetime import *\nfrom collections import *\n"
    "from heapq import *\nfrom bisect import *\nfrom copy import *\nfrom math import *\nfrom random import *\n"
    "from statistics import *\nfrom itertools import *\nfrom functools import *\nfrom operator import *\n"
    "from io import *\nfrom sys import *\nfrom json import *\nfrom builtins import *\nfrom typing import *\n"
    "import string, re, datetime, collections, heapq, bisect, copy, math, random, statistics, itertools\n"
    "import functools, operator, io, sys, json\nsys.setrecursionlimit(50000)\n"
)
#: preludes a benchmark spec can name (``prelude``): code put before every program
PRELUDES = {"livecodebench": LIVECODEBENCH_PRELUDE}


class TestCodeError(ValueError):
    """An OriginFmt ``test`` program that does not hold readable inputs and a tolerance."""

    __test__ = False  # not a pytest test class


class _Specials(ast.NodeTransformer):
    """``inf`` and ``nan`` as ``repr`` writes them (bare names) become constants."""

    _NAMES = {"inf": math.inf, "nan": math.nan}

    def visit_Name(self, node: ast.Name) -> ast.AST:  # noqa: N802 (ast API)
        if node.id in self._NAMES:
            return ast.copy_location(ast.Constant(self._NAMES[node.id]), node)
        return node


def _literal(node: ast.AST) -> Any:
    """The value of a literal expression node (lists, tuples, sets, dicts, numbers, strings,
    ``inf``/``nan``); ``ValueError`` for anything else (a call, a name, an operation)."""
    return ast.literal_eval(_Specials().visit(node))


def _check_function(tree: ast.Module) -> ast.FunctionDef:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "check":
            return node
    raise TestCodeError("no `def check(candidate)` in the test code")


def _tolerance(check: ast.FunctionDef) -> float:
    """The ``atol`` of the check's assertion: the third argument of ``assertion(out, exp,
    atol)``, or the bound of ``assert ... <= atol`` (``find_zero``)."""
    for node in ast.walk(check):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "assertion"
            and len(node.args) == 3
        ):
            return float(_literal(node.args[2]))
        if (
            isinstance(node, ast.Assert)
            and isinstance(node.test, ast.Compare)
            and len(node.test.ops) == 1
            and isinstance(node.test.ops[0], ast.LtE)
        ):
            return float(_literal(node.test.comparators[0]))
    raise TestCodeError(
        "no `assertion(candidate(*inp), exp, atol)` call and no `assert ... <= atol` in check()"
    )


def parse_originfmt_test(test: str) -> dict[str, Any]:
    """``{"inputs": [...], "expected": [...] or None, "atol": float}`` from an OriginFmt
    ``test`` program. ``expected`` is None where the check compares with a ``ref_func``
    (no ``results`` list). Raises :class:`TestCodeError` naming what is missing."""
    try:
        tree = ast.parse(test)
    except (SyntaxError, ValueError) as e:
        raise TestCodeError(f"the test code does not parse: {e}") from None
    check = _check_function(tree)
    found: dict[str, Any] = {}
    for node in check.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id in ("inputs", "results")
        ):
            try:
                found[node.targets[0].id] = _literal(node.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
                raise TestCodeError(
                    f"`{node.targets[0].id} = ...` is not a literal ({type(e).__name__})"
                ) from None
    inputs = found.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(a, (list, tuple)) for a in inputs):
        raise TestCodeError("no `inputs = [...]` list of argument lists in check()")
    expected = found.get("results")
    if expected is not None and (not isinstance(expected, list) or len(expected) != len(inputs)):
        raise TestCodeError(f"`results` is not a list of {len(inputs)} values, one per input")
    return {"inputs": [list(a) for a in inputs], "expected": expected, "atol": _tolerance(check)}


def _as_inputs(raw: Any) -> list[list]:
    if isinstance(raw, str):
        raw = json.loads(raw)
    if hasattr(raw, "tolist"):  # numpy arrays from parquet
        raw = raw.tolist()
    return [list(a) for a in (raw or [])]


def humaneval_row(rec: Mapping[str, Any]) -> dict[str, Any]:
    """The uniform row of a HumanEval+ record in either layout: ``entry_point``,
    ``canonical_solution``, ``base_input``, ``plus_input``, ``atol`` and ``expected`` (the
    OriginFmt ``results``; None: run the canonical solution). OriginFmt inputs are base and
    plus merged, all in ``base_input``. Raises ``ValueError`` saying what the record lacks."""
    row = {"entry_point": rec["entry_point"], "canonical_solution": rec["canonical_solution"]}
    if "base_input" in rec:  # the evalplus release
        return row | {
            "base_input": _as_inputs(rec["base_input"]),
            "plus_input": _as_inputs(rec.get("plus_input")),
            "atol": float(rec.get("atol") or 0.0),
            "expected": None,
        }
    if isinstance(rec.get("test"), str):  # OriginFmt
        parsed = parse_originfmt_test(rec["test"])
        return row | {
            "base_input": parsed["inputs"],
            "plus_input": [],
            "atol": parsed["atol"],
            "expected": parsed["expected"],
        }
    raise ValueError("neither `base_input` (evalplus release) nor a `test` program (OriginFmt)")


# -- rllm / LiveCodeBench / CodeForces -----------------------------------------------------------
_STARTER_DEF = re.compile(r"^\s+def\s+(\w+)\s*\(\s*self\b", re.M)
_TOP_DEF = re.compile(r"^def\s+(\w+)\s*\(", re.M)


def _func_name(meta: Any) -> str | None:
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            return None
    if isinstance(meta, Mapping) and meta.get("func_name"):
        return str(meta["func_name"])
    return None


def functional_name(tests: list, metadata: Any = None, starter_code: Any = None) -> str | None:
    """The function a functional (LeetCode-style) problem's tests call: the tests' own
    ``fn_name`` or ``metadata.func_name``, the record's ``metadata.func_name``, else the
    method that ``starter_code`` declares in ``class Solution`` (LiveCodeBench copies whose
    metadata was dropped), else its top-level function. None for stdin/stdout problems."""
    first = tests[0] if tests and isinstance(tests[0], Mapping) else {}
    if first.get("fn_name"):
        return str(first["fn_name"])
    name = _func_name(first.get("metadata")) or _func_name(metadata)
    if name:
        return name
    if first.get("testtype") == "functional" and isinstance(starter_code, str):
        m = _STARTER_DEF.search(starter_code) or _TOP_DEF.search(starter_code)
        return m.group(1) if m else None
    return None


def usable_tests(tests: Any, fn_name: str | None) -> str | None:
    """Why ``tests`` cannot grade a program (None when they can): each test needs an
    ``input`` and an ``output``; functional tests need a function name."""
    if not isinstance(tests, list) or not tests:
        return "no tests"
    for i, t in enumerate(tests):
        if not isinstance(t, Mapping) or "input" not in t or "output" not in t:
            return f"test {i} lacks an input or an output"
    if tests[0].get("testtype") == "functional" and not fn_name:
        return "functional tests without a function name (metadata.func_name or starter code)"
    return None


_TIME = re.compile(
    r"time limit(?: per test)?\s*[:：]?\s*(\d+(?:\.\d+)?)\s*(ms|milliseconds?|s|sec|seconds?)\b",
    re.I,
)
_MEMORY = re.compile(
    r"memory limit(?: per test)?\s*[:：]?\s*(\d+(?:\.\d+)?)\s*(mb|megabytes?|mib|gb|gigabytes?)\b",
    re.I,
)


def statement_limits(text: str) -> tuple[float | None, int | None]:
    """``(time_limit_s, memory_limit_mb)`` a problem statement states (``Time Limit: 2000 ms``,
    ``time limit per test: 2 seconds``, ``Memory Limit: 256 MB``), None where it states none."""
    time_s = memory_mb = None
    if isinstance(text, str):
        m = _TIME.search(text)
        if m:
            time_s = float(m.group(1)) / (1000.0 if m.group(2).lower().startswith("m") else 1.0)
        m = _MEMORY.search(text)
        if m:
            memory_mb = int(float(m.group(1)) * (1024 if m.group(2).lower().startswith("g") else 1))
    return time_s, memory_mb
