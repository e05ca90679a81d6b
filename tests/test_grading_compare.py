"""The grading comparisons, called in this process (no worker pool): math answer extraction
and equivalence (disa.tasks.math_reward) and the output comparison of code tests
(disa.tasks.code_reward), against hand-worked cases. ``experiments/mutation.py grading``
mutates the lines these tests reach."""

from __future__ import annotations

import importlib.metadata
import math
import signal

import pytest

from disa.tasks import code_reward as cr
from disa.tasks import math_reward as mr


# -- math: answer extraction ---------------------------------------------------------------
def test_last_boxed_braces():
    assert mr.last_boxed(r"\boxed{ 7 }") == "7"  # stripped
    # escaped braces belong to the answer (sets), they neither open nor close it
    assert mr.last_boxed(r"\boxed{\{1, 2\}} and more") == r"\{1, 2\}"
    assert mr.last_boxed(r"\boxed{a\}") is None  # only an escaped brace: never closed
    assert mr.last_boxed("\\boxed{1\\") is None  # a trailing backslash at the very end
    assert mr.last_boxed(r"\boxed{a}\boxed{b}") == "b"
    assert mr.last_boxed(r"\boxed{x^{2}} + \fbox{y_{1}}") == "y_{1}"
    assert mr.last_boxed("") is None


def test_strip_math_delims():
    assert mr._strip_math_delims("  $5$ ") == "5"
    assert mr._strip_math_delims("$$ x $$") == "x"
    assert mr._strip_math_delims(r"\( x \)") == "x"
    assert mr._strip_math_delims(r"\[x\]") == "x"
    assert mr._strip_math_delims(r"$ \(5\) $") == "5"  # nested: the inner pair goes too
    assert mr._strip_math_delims("$$") == ""  # an empty $...$
    assert mr._strip_math_delims("$") == "$"  # too short to be a pair
    assert mr._strip_math_delims("$5") == "$5"


@pytest.mark.parametrize(
    ("completion", "want"),
    [
        ("Answer: 1\nthen\nAnswer: 2", "2"),  # the last marker
        ("Answer: 1\nanswer：3", "3"),  # case and the full-width colon
        ("**Answer: 5**", "5"),
        ("Answer: 2X", "2X"),
        ("Answer: 2X.", "2X"),
        ("Answer: $2X.$", "2X"),
        ("Answer: $2.$ ", "2"),
        ("Answer: 5. I hope it is correct.", "5"),
        ("Answer: The final answer is: 9", "9"),
        ("Answer: $$", None),  # nothing left
        ("Answer: $", "$"),
        ("Answer:   ", None),
        ("no marker", None),
    ],
)
def test_answer_marker(completion, want):
    assert mr._answer_marker(completion) == want


def test_extract_says_how():
    assert mr._extract(r"so \boxed{7}", "strict") == ("7", "boxed")
    assert mr._extract("Answer: 42", "strict") == ("42", "marker")
    # the last \boxed is unclosed (truncated): the marker's own \boxed is used, unwrapped
    assert mr._extract("Answer: \\boxed{7}\n\\boxed{8", "strict") == ("7", "marker")
    assert mr._extract(r"\boxed{} Answer: 3", "strict") == ("3", "marker")  # an empty box is none
    assert mr._extract("so 5", "lenient") == ("so 5", "whole")
    assert mr._extract("so 5", "strict") == (None, "none")
    assert mr._extract(" \n\t", "lenient") == (None, "none")
    assert mr.extract_answer(" \n\t", "lenient") is None
    assert mr.extract_answer("so 5") is None  # strict by default
    with pytest.raises(ValueError, match=r"^mode='loose'; allowed: \['strict', 'lenient'\]$"):
        mr._extract("x", "loose")


def test_as_latex():
    assert mr._as_latex("$69$,$84$") == r"\boxed{69,84}"
    assert mr._as_latex(" 5 ") == r"\boxed{5}"
    assert mr._as_latex(r"\$5") == r"\boxed{\$5}"  # an escaped dollar stays
    assert mr._as_latex(r"$\boxed{3}$") == r"\boxed{3}"  # already boxed: not boxed twice


# -- math: equivalence (math-verify, in this process) ---------------------------------------
@pytest.fixture(scope="module")
def mv():
    return pytest.importorskip("math_verify")


def test_grade_one_in_process(mv):
    assert mr.grade_one("0.5", r"so \boxed{\frac{1}{2}}") == 1.0
    assert mr.grade_one("27", "Answer: 27") == 1.0
    # the extracted answer is parsed, boxed, not the completion: math-verify reads no bare
    # LaTeX in plain text, and would take an earlier "final answer is" over the marker
    assert mr.grade_one(r"\sqrt{2}", r"Answer: \sqrt{2}") == 1.0
    assert mr.grade_one("7", "The final answer is $5$.\nAnswer: 7") == 1.0
    assert mr.grade_one("5", r"\boxed{6}") == 0.0
    assert mr.grade_one("5", "the total is 5") == 0.0  # strict by default: no final answer
    assert mr.grade_one("5", "the total is 5", "lenient") == 1.0  # the whole text, parsed as is
    assert mr.grade_one("5", "???", "lenient") == 0.0  # nothing parses
    with pytest.raises(mr.GoldParseError, match=r"^gold '' does not parse$"):
        mr.grade_one("", r"\boxed{5}")
    # math-verify would keep a truncated gold as text and grade every answer 0: refused
    with pytest.raises(mr.GoldParseError, match=r"malformed: 1 brace\(s\) never closed"):
        mr.grade_one("\\frac{", r"\boxed{\frac{1}{2}}")


@pytest.mark.parametrize(
    ("gold", "why"),
    [
        (r"\frac{1}{2}", None),
        (r"\{1, 2\}", None),  # escaped braces are the set's, not LaTeX groups
        (r"\left( 3, \frac{\pi}{2} \right)", None),
        (r"\leftarrow", None),  # not \left
        ("62.5%", None),
        (r"\frac{", "1 brace(s) never closed"),
        (r"x^{2^{3", "2 brace(s) never closed"),
        ("1}{", "a '}' closes a brace never opened"),
        ("a\\", "it ends with a backslash"),
        (r"\left[ 0, 1 )", "\\left and \\right do not pair up"),
    ],
)
def test_malformed_gold(gold, why):
    assert mr.malformed_gold(gold) == why


def test_grade_one_leaves_the_callers_timer_alone(mv):
    """The worker bounds an item with its own interval timer; math-verify's alarms (its
    default timeouts) would cancel it, so grade_one must switch them off."""
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 100.0)
        assert mr.grade_one("0.5", r"\boxed{\frac{1}{2}}") == 1.0
        assert mr.grade_one("0.5", r"\boxed{0.6}") == 0.0
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert 90 < remaining <= 100 and not fired


def _fake_version(version):
    def fake(name):
        if name != "math-verify":
            raise importlib.metadata.PackageNotFoundError(name)
        if isinstance(version, Exception):
            raise version
        return version

    return fake


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("0.7.9", False),
        ("0.8.0", True),
        ("0.10.1", True),  # numeric, not string order
        ("1.0", True),
        (importlib.metadata.PackageNotFoundError("math-verify"), True),  # a source checkout
        ("main", True),  # unparsable: assumed recent
    ],
)
def test_math_verify_version_gate(mv, monkeypatch, version, ok):
    monkeypatch.setattr(mr, "_VERSION_CHECKED", False)
    monkeypatch.setattr(importlib.metadata, "version", _fake_version(version))
    if ok:
        assert mr._import_math_verify() == (mv.parse, mv.verify)
        # checked once per process: a later call does not look again
        monkeypatch.setattr(importlib.metadata, "version", _fake_version("0.1.0"))
        assert mr._import_math_verify() == (mv.parse, mv.verify)
    else:
        with pytest.raises(
            ImportError,
            match=r"^math grading needs math-verify>=0\.8 \(math grading needs the 'math' extra",
        ):
            mr._import_math_verify()
        assert mr._VERSION_CHECKED is False  # and it is checked again next time


# -- code: extraction and output comparison ------------------------------------------------
def test_extract_code():
    assert cr.extract_code("```Python\nprint(1)\n```") == "print(1)"
    assert cr.extract_code("```py3 main\na\n```\n```\nb\n```") == "a"  # python over plain
    assert cr.extract_code("```python\na\n```\n```python\nb\n```") == "b"  # the last one
    assert cr.extract_code("```\nb\n```\n```js\nc\n```") == "b"  # no python: the plain one
    assert cr.extract_code("```js\nc\n```") == "```js\nc\n```"  # else the whole text
    assert cr.extract_code("\n\n  x = 1\n\n") == "  x = 1"  # newlines only are trimmed
    assert cr.extract_code("X = 1\nX\n") == "X = 1\nX"
    assert cr.extract_code("```python\nX\n```") == "X"
    assert cr.extract_code("```python\n\n  x = 1\n\n") == "  x = 1"  # unclosed: to the end


class _Boom:
    def __eq__(self, other):
        raise RuntimeError("no comparison")

    __hash__ = object.__hash__


@pytest.mark.parametrize(
    ("out", "exp", "compare", "want"),
    [
        # LiveCodeBench's rule: lines stripped; each equal as text or as decimals
        ("1 2\n3\n", "  1 2 \n 3", "lines", True),
        ("1  2\n3", "1 2\n3", "lines", True),  # inner spacing: equal as decimals
        ("a  b", "a b", "lines", False),  # ... but not as text
        ("1.50 2", "1.5 2.0", "lines", True),
        ("0.3333333", "0.333333333", "lines", False),  # decimals equal exactly, no tolerance
        ("YES", "yes", "lines", False),  # no case folding
        ("1 2 3", "1 2\n3", "lines", False),  # the line structure counts
        ("1\n\n2", "1\n2", "lines", False),  # an inner blank line counts
        ("", "", "lines", True),
        # Codeforces checkers: tokens, line breaks aside
        ("1 2 3", "1 2\n3", "tokens", True),
        ("yEs\nno", "YES\nNO", "tokens", True),  # YES/NO in any case
        ("Yes", "YESS", "tokens", False),
        ("abc", "ABC", "tokens", False),  # other text keeps its case
        ("0.3333333", "0.333333333", "tokens", True),  # |Δ| = 3.3e-8 <= 1e-6
        ("1.0000011", "1.0", "tokens", False),  # |Δ| = 1.1e-6 > 1e-6
        ("1000000.5", "1000000.0", "tokens", True),  # relative: 0.5 <= 1e-6 · 1e6
        ("1000002.5", "1000000.0", "tokens", False),
        ("5", "5.000000", "tokens", True),  # one real: compared as numbers
        ("05", "5", "tokens", False),  # two integers: as text
        ("1e3", "1000.0", "tokens", True),
        ("nan", "1.0", "tokens", False),
        ("1 2", "1 2 3", "tokens", False),
        ("", "", "tokens", True),
    ],
)
def test_outputs_equal(out, exp, compare, want):
    assert cr.outputs_equal(out, exp, compare) is want


def test_outputs_equal_tolerance_and_mode():
    assert cr.outputs_equal("1.001", "1.0", float_tolerance=1e-2)
    assert not cr.outputs_equal("1.001", "1.0", float_tolerance=0.0)
    with pytest.raises(ValueError, match=r"compare='exact'; allowed: \['tokens', 'lines'\]"):
        cr.outputs_equal("1", "1", "exact")


@pytest.mark.parametrize(
    ("out", "exp", "want"),
    [
        ((0, 1), [0, 1], True),  # a returned tuple reads as a list
        ([[1, 2], (3,)], [[1, 2], [3]], True),
        (0.30000000000000004, 0.3, False),  # no float tolerance (LiveCodeBench)
        (1, 1.0, True),
        ("1", 1, False),
        ({"a": (1,)}, {"a": [1]}, True),
    ],
)
def test_values_equal(out, exp, want):
    assert cr.values_equal(out, exp) is want


def test_values_equal_errors_are_mismatches():
    assert cr.values_equal(_Boom(), 1) is False


@pytest.mark.parametrize(
    ("out", "exp", "atol", "want", "atol_after"),
    [
        (1, 1, 0.0, True, 0.0),
        (0.5000001, 0.5, 0.0, True, 1e-6),  # a float expected value switches the tolerance on
        (0.500002, 0.5, 0.0, False, 1e-6),
        ([1.0, 2.0000001], [1.0, 2.0], 0.0, True, 1e-6),
        ([1, 2.0000001], [1, 2.0], 0.0, False, 0.0),  # not all floats: exact only
        ((1.0, 2.0000001), [1.0, 2.0], 0.0, False, 1e-6),  # the same type is required
        ([1.0], [1.0, 2.0], 0.0, False, 1e-6),  # and the same length
        (3, 3.0000001, 0.0, False, 1e-6),  # int against float: types differ
        ([], [], 0.0, True, 0.0),
        (2.0, 1.0, 1.0, True, 1.0),  # |Δ| <= atol + 1e-7·|exp|
        (2.1, 1.0, 1.0, False, 1.0),
        ([[1.0]], [[1.0000001]], 0.0, False, 0.0),  # nested: is_floats is false, exact only
        ("a", "b", 1e-6, False, 1e-6),  # np.allclose on text raises: a mismatch
        (float("nan"), float("nan"), 0.0, False, 1e-6),
    ],
)
def test_evalplus_equal(out, exp, atol, want, atol_after):
    assert cr.evalplus_equal(out, exp, atol) == (want, atol_after)


def test_evalplus_helpers():
    assert cr.evalplus_time_limits([0.0, 0.5, 2.0]) == [4.0, 4.0, 8.0]  # max(4 s, 4 × t)
    assert cr.evalplus_time_limits([0.1], factor=2.0, floor_s=0.1) == [pytest.approx(0.2)]
    assert cr._poly([1, -3, 2], 1.0) == 0.0 and cr._poly([1, 0, 1], 2.0) == 5.0
    assert cr._find_zero_ok([-6, 11, -6, 1], 1.00001, 1e-4) and not cr._find_zero_ok(
        [-6, 11, -6, 1], 1.001, 1e-4
    )
    assert cr._find_zero_ok([1, 1], "x", 1.0) is False


def test_lists_for_tuples():
    got = cr._lists_for_tuples((1, (2, [3, (4,)]), {"k": (5, 6)}, "s"))
    assert got == [1, [2, [3, [4]]], {"k": [5, 6]}, "s"]
    assert type(got[1]) is list and type(got[1][1][1]) is list and type(got[2]["k"]) is list
    assert math.isnan(cr._lists_for_tuples(float("nan")))
