"""Math rewards: extract a final answer from a completion and check it against the gold with
HF ``math-verify``.

Two facts about ``math-verify`` shape this module:

* its own timeouts use ``signal.alarm``, which only works in the main thread of a process,
  and its timeout exception derives from ``BaseException`` (an ``except Exception`` does not
  catch it; with ``raise_on_error=False`` it is silently turned into "not equal");
* an unparsable or hung comparison must not become a reward of 0.

So grading runs in worker *processes* (:class:`MathGrader`, a ``pebble`` process pool), one
item at a time, under two timeouts: inside the worker an interval timer raises a private
``BaseException`` after ``timeout_s`` (math-verify's own alarms are switched off so they
cannot clobber ours), and pebble kills and replaces a worker that has not answered
``grace_s`` later (a hang in C code never returns to the interpreter to see the signal). Every such failure — timeout,
crash, unparsable gold — yields ``None``: callers count it as missing, never as wrong.

Answer extraction (:func:`extract_answer`): ``"strict"`` accepts only an explicit final
answer, the last ``\\boxed{...}`` (or ``\\fbox``) or else the last ``Answer: ...`` line;
``"lenient"`` falls back to math-verify's own parsing of the whole completion, which ends in
"the last number anywhere", too lenient for a training reward but usual for evaluation.

What math-verify extracts itself and what stays here, by a parity test over the golds and
wrong answers of the six local math sets (``tests/test_math_reward.py``): a boxed answer is
read by math-verify's anchored ``LatexExtractionConfig`` (:func:`_anchored_config`), which
grades all of them alike. Two things stay here: :func:`last_boxed` decides whether the last
box is closed, because both libraries read an unclosed final ``\\boxed{`` (math-verify's
pattern runs to the last brace, ``latex2sympy2_extended``'s ``extract_boxed_content``
returns the rest of the text) while a truncated answer must earn nothing; and the
``Answer:`` line, because math-verify reads an answer after "answer:" only inside a math
environment (``$...$``) or as a plain number, so a bare ``Answer: \\sqrt{2}``, a set, a
number in scientific notation or a text answer goes unread (30 of the 230 sampled golds
written that way), and it prefers a higher-priority anchor anywhere in the text to the last
line.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import multiprocessing as mp
import re
import signal
from collections.abc import Callable, Sequence

__all__ = [
    "GoldParseError",
    "MathGrader",
    "extract_answer",
    "grade",
    "grade_one",
    "last_boxed",
    "malformed_gold",
]

log = logging.getLogger(__name__)

MODES = ("strict", "lenient")
_MISSING_EXTRA = "math grading needs the 'math' extra: pip install 'disa[math]'"
_VERSION_CHECKED = False


def _import_math_verify():
    """``(parse, verify)`` from math_verify, with an actionable message when missing."""
    try:
        from math_verify import parse, verify
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(_MISSING_EXTRA) from e
    global _VERSION_CHECKED
    if not _VERSION_CHECKED:
        # Timeouts can be switched off (None) only from math-verify 0.8 on; before, its
        # alarm would clobber the worker's own timer.
        try:
            version = importlib.metadata.version("math-verify")
            major, minor = (int(x) for x in version.split(".")[:2])
        except (importlib.metadata.PackageNotFoundError, ValueError):
            major, minor = 0, 8  # a source checkout: assume recent
        if (major, minor) < (0, 8):
            raise ImportError(f"math grading needs math-verify>=0.8 ({_MISSING_EXTRA})")
        _VERSION_CHECKED = True
    return parse, verify


# --------------------------------------------------------------------------------------
# answer extraction (pure text, no math_verify needed)
# --------------------------------------------------------------------------------------
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_MARKER = re.compile(r"(?i)\banswer\s*(?:\*\*)?\s*[:：]\s*(?:\*\*)?(.*)")
_FINAL_IS = re.compile(r"(?i)^\s*the\s+final\s+answer\s+is\s*[:：]?\s*")
_HOPE = re.compile(r"(?i)\s*\.?\s*I hope it is correct\.?\s*$")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced.

    ``None`` when there is none, or when the last one is never closed (a truncated
    completion): a half answer is no answer.
    """
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        i = start
        while i < len(text):
            c = text[i]
            if c == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
                i += 2  # escaped brace: \{ or \} inside the answer (sets)
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
            i += 1
        return None  # the last one is unclosed: do not fall back to an earlier one
    return None


def _strip_math_delims(s: str) -> str:
    s = s.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left) : len(s) - len(right)].strip()
    return s


def _answer_marker(text: str) -> str | None:
    """The text after the last ``Answer:`` marker (to the end of its line), cleaned."""
    found = None
    for line in text.splitlines():
        matches = list(_ANSWER_MARKER.finditer(line))
        if matches:
            found = matches[-1].group(1)
    if found is None:
        return None
    s = _HOPE.sub("", found.strip())
    s = _FINAL_IS.sub("", s).strip().rstrip("*").strip()
    s = s.rstrip(".").strip()
    s = _strip_math_delims(s).rstrip(".").strip()
    return s or None


def _extract(completion: str, mode: str) -> tuple[str | None, str]:
    """``(answer_text, how)`` with ``how`` in ``boxed | marker | whole | none``."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed: {list(MODES)}")
    boxed = last_boxed(completion)
    if boxed:
        return boxed, "boxed"
    marked = _answer_marker(completion)
    if marked:
        inner = last_boxed(marked)
        return (inner or marked), "marker"
    if mode == "lenient" and completion.strip():
        return completion, "whole"
    return None, "none"


def extract_answer(completion: str, mode: str = "strict") -> str | None:
    """The final answer written in ``completion``.

    ``"strict"``: the last ``\\boxed{}`` if any, else the text after the last ``Answer:``
    marker; ``None`` when neither exists. ``"lenient"``: the same, else the whole completion
    (which math-verify then parses on its own, down to the last number in the text).
    """
    return _extract(completion, mode)[0]


def _as_latex(answer: str) -> str:
    """Wrap a bare answer in ``\\boxed{}`` (math-verify's highest-priority pattern) after
    removing unescaped ``$`` (OlympiadBench writes golds like ``$69$,$84$``)."""
    a = re.sub(r"(?<!\\)\$", "", answer).strip()
    return a if "\\boxed" in a else "\\boxed{" + a + "}"


class GoldParseError(ValueError):
    """The gold answer did not parse: the item cannot be graded (-> missing, not 0)."""


_LEFT, _RIGHT = re.compile(r"\\left(?![A-Za-z])"), re.compile(r"\\right(?![A-Za-z])")


def malformed_gold(gold: str) -> str | None:
    """Why ``gold`` cannot be a complete LaTeX answer, or None when it can.

    math-verify never refuses a gold: what its LaTeX parser cannot read, it keeps as a string
    to compare as text, so a truncated gold (``\\frac{``) would grade every answer 0.
    Whether a gold *parses* cannot be the test either, since real golds that are not LaTeX
    expressions are kept as text the same way (``62.5%``, ``-1./3``, ``E_{1},E_{2}``). The
    rule is structural instead: braces that do not balance (escaped ``\\{`` ``\\}`` aside),
    ``\\left`` without its ``\\right``, or a trailing backslash. No gold of the six local
    math sets (AIME24, AMC23, MATH500, Minerva, OlympiadBench, GSM8K) breaks it.
    """
    depth, i = 0, 0
    while i < len(gold):
        c = gold[i]
        if c == "\\":
            if i + 1 == len(gold):
                return "it ends with a backslash"
            i += 2  # an escaped character or a command's first letter
            continue
        depth += (c == "{") - (c == "}")
        if depth < 0:
            return "a '}' closes a brace never opened"
        i += 1
    if depth:
        return f"{depth} brace(s) never closed"
    if len(_LEFT.findall(gold)) != len(_RIGHT.findall(gold)):
        return "\\left and \\right do not pair up"
    return None


def grade_one(gold: str, completion: str, mode: str = "strict") -> float:
    """1.0 if the completion's answer equals ``gold`` (math-verify), else 0.0.

    Runs in the *current* process with no timeout: call it from a worker process (it is the
    function :class:`MathGrader` runs). Raises :class:`GoldParseError` for an unparsable
    gold; a missing or unparsable *prediction* is a wrong answer (0.0).
    """
    parse, verify = _import_math_verify()
    why = malformed_gold(str(gold))
    if why:
        raise GoldParseError(f"gold {gold!r} is malformed: {why}")
    # Timeouts off (None): the worker's own timer bounds the whole item instead.
    g = parse(_as_latex(str(gold)), parsing_timeout=None)
    if not g:
        raise GoldParseError(f"gold {gold!r} does not parse")
    answer, how = _extract(completion, mode)
    if answer is None:
        return 0.0
    if how == "boxed":  # math-verify's own anchored extraction, as open-r1 uses it
        p = parse(completion, extraction_config=_anchored_config(), parsing_timeout=None)
    else:
        p = parse(completion if how == "whole" else _as_latex(answer), parsing_timeout=None)
    if not p:
        return 0.0
    return 1.0 if verify(g, p, timeout_seconds=None) else 0.0


def _anchored_config() -> list:
    """math-verify's extraction of an anchored answer only (``\\boxed{}`` first, then "final
    answer is $...$"), never the last number anywhere: the configuration open-r1's accuracy
    reward uses. Used for completions whose last box is closed; a parity test
    (``tests/test_math_reward.py``) shows it grades every gold and wrong answer of the six
    local math sets as the boxed-content route did. Where it differs: adjacent boxes joined by
    "and" or a comma are read together (a set), as open-r1 grades them."""
    from math_verify import LatexExtractionConfig

    return [LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)]


# --------------------------------------------------------------------------------------
# worker processes
# --------------------------------------------------------------------------------------
class _ItemTimeout(BaseException):
    """Raised by the worker's interval timer. A BaseException so that library code with
    ``except Exception`` (math-verify, sympy) cannot swallow it."""


def _on_alarm(signum, frame):  # pragma: no cover - runs in the worker
    raise _ItemTimeout()


def _worker_init() -> None:  # pragma: no cover - runs in each worker process
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # we handle timeouts ourselves
    # A custom grader may not need math_verify; the default one reports the error per item.
    with contextlib.suppress(ImportError):
        _import_math_verify()
    signal.signal(signal.SIGALRM, _on_alarm)


def _grade_item(
    grader: Callable[[str, str, str], float],
    gold: str,
    completion: str,
    mode: str,
    timeout_s: float,
) -> tuple[float | None, str | None]:  # pragma: no cover - in a worker
    """``(value, error)`` of one item, in a worker's main thread (signals work there)."""
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return float(grader(gold, completion, mode)), None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _ItemTimeout:
        return None, "timeout"
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # incl. math_verify's TimeoutException (a BaseException)
        return None, f"{type(e).__name__}: {e}"[:500]


def _default_context() -> mp.context.BaseContext:
    """The start method for grading workers, chosen deliberately.

    Not ``fork``: the harness process is multi-threaded (torch's pools, tokenizers, W&B)
    and may hold CUDA state; forking it can deadlock the child on a lock held by another
    thread, and CUDA does not survive a fork. ``forkserver`` forks from a small,
    single-threaded server process started once with a clean interpreter, and preloading
    math-verify/sympy there (~1 s of imports) makes later workers — including the
    replacements for killed ones — start in milliseconds. Where ``forkserver`` is
    unavailable (Windows), ``spawn``: equally safe, but each worker pays the imports.
    """
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        # Effective only if the fork server is not running yet; harmless otherwise.
        ctx.set_forkserver_preload(["math_verify", "disa.tasks.math_reward"])
        return ctx
    return mp.get_context("spawn")


class MathGrader:
    """A pool of grading worker processes (``pebble.ProcessPool``); reusable across calls
    (``with`` or ``close()``).

    Each item runs under two timeouts: the worker's own interval timer raises a private
    ``BaseException`` after ``timeout_s`` (math-verify's alarms are switched off so they
    cannot clobber it), and pebble kills and replaces a worker still busy ``grace_s`` later
    (a hang in C code never returns to the interpreter to see the signal). A worker that
    dies takes only its item with it; workers that cannot start at all break the pool, and
    :meth:`grade` says so.

    Args:
        workers: number of worker processes.
        timeout_s: per-item limit inside the worker.
        grace_s: extra time before a silent worker is killed.
        grader: ``f(gold, completion, mode) -> float`` run in the workers; must be picklable
            (a module-level function). Default :func:`grade_one`.
        mp_context: a ``multiprocessing`` context or start-method name; default see
            :func:`_default_context`.

    As with any start method but ``fork``, the workers re-import the main module: run from
    a script file or ``python -m`` (guarding top-level work with ``if __name__ ==
    "__main__"``), a notebook or ``python -c``, not ``python - < file``.
    """

    def __init__(
        self,
        workers: int = 2,
        timeout_s: float = 5.0,
        *,
        grace_s: float = 2.0,
        grader: Callable[[str, str, str], float] | None = None,
        mp_context: str | mp.context.BaseContext | None = None,
    ) -> None:
        if grader is None:
            _import_math_verify()  # fail here, in the caller, with the install hint
            grader = grade_one
        if workers < 1:
            raise ValueError(f"workers={workers}; need >= 1")
        self.n_workers = int(workers)
        self.timeout_s = float(timeout_s)
        self.grace_s = float(grace_s)
        self.grader = grader
        if isinstance(mp_context, str):
            mp_context = mp.get_context(mp_context)
        self.ctx = mp_context or _default_context()
        self._pool = None
        #: errors of the last :meth:`grade` call, by item index (timeouts, crashes, ...)
        self.last_errors: dict[int, str] = {}

    def __enter__(self) -> MathGrader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; close() is the real API
        with contextlib.suppress(Exception):
            self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.stop()
            self._pool.join()
            self._pool = None

    def _workers(self):
        if self._pool is None:
            try:
                from pebble import ProcessPool
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ImportError(_MISSING_EXTRA) from e
            self._pool = ProcessPool(
                max_workers=self.n_workers, initializer=_worker_init, context=self.ctx
            )
        return self._pool

    def grade(
        self, golds: Sequence[str], completions: Sequence[str], mode: str = "strict"
    ) -> list[float | None]:
        """1.0 / 0.0 per item, ``None`` where grading failed (see :attr:`last_errors`)."""
        from concurrent.futures.process import BrokenProcessPool

        from pebble import ProcessExpired

        if len(golds) != len(completions):
            raise ValueError(f"{len(golds)} golds but {len(completions)} completions")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; allowed: {list(MODES)}")
        self.last_errors = {}
        if not golds:
            return []
        limit = self.timeout_s + self.grace_s
        pool = self._workers()
        futures = [
            pool.schedule(
                _grade_item, args=(self.grader, str(g), str(c), mode, self.timeout_s), timeout=limit
            )
            for g, c in zip(golds, completions)
        ]
        results: list[float | None] = [None] * len(futures)
        for i, future in enumerate(futures):
            try:
                results[i], error = future.result()
            except TimeoutError:
                error = f"timeout (killed after {limit:.1f} s)"
            except ProcessExpired as e:
                error = f"worker died (exit code {e.exitcode})"
            except BrokenProcessPool as e:
                self.close()
                raise RuntimeError(
                    f"math grading workers cannot start ({e}); see the log of the worker processes"
                ) from None
            if error is not None:
                self.last_errors[i] = error
        if self.last_errors:
            log.info(
                "math grading: %d of %d items missing (timeouts/errors)",
                len(self.last_errors),
                len(results),
            )
        return results


def grade(
    golds: Sequence[str],
    completions: Sequence[str],
    mode: str = "strict",
    timeout_s: float = 5.0,
    workers: int = 2,
    **kwargs,
) -> list[float | None]:
    """Grade ``completions`` against ``golds`` (same length) in worker processes.

    Returns 1.0 (correct) / 0.0 (wrong, or no extractable answer) per item, and ``None``
    where grading itself failed (timeout, worker crash, unparsable gold): count those as
    missing. ``kwargs`` go to :class:`MathGrader` (``grader``, ``grace_s``, ``mp_context``).
    For repeated calls (a training loop) keep a :class:`MathGrader` open instead.
    """
    workers = max(1, min(int(workers), len(golds) or 1))
    with MathGrader(workers=workers, timeout_s=timeout_s, **kwargs) as g:
        return g.grade(golds, completions, mode)
