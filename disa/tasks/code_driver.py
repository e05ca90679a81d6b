"""The call driver of the code reward (:func:`disa.tasks.code_reward.grade_functional`):
a script run inside the sandbox, never imported.

It executes the program (``solution.py``), calls the function on each input of
``tests.json`` under that input's timer (``timeouts``), times each call, and prints
``"<nonce><json>"`` lines on a private copy of stdout (the program's own prints go to
/dev/null), so that a program cannot forge a result line without the nonce. It sees inputs, never expected values. Standard library only:
the sandbox runs it with ``python -I -S``.
"""

if __name__ != "__main__":
    raise ImportError("disa/tasks/code_driver.py is a script run inside the sandbox, not a module")

import hashlib
import io
import json
import os
import signal
import sys
import time

NONCE = sys.argv[1]
with open("tests.json", encoding="utf-8") as f:
    CFG = json.load(f)
_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
_null = os.open(os.devnull, os.O_WRONLY)
os.dup2(_null, 1)
sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the program's prints, for the whole run)
sys.stdin = io.StringIO("")
sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))


def emit(obj):
    _out.write(NONCE + json.dumps(obj) + "\n")
    _out.flush()


def enc(x, depth=0):
    # Sets and dicts in a canonical order: large values are compared by digest, and set
    # order depends on the (random) hash seed.
    if depth > 200:
        raise ValueError("value nested too deeply")
    if x is None or isinstance(x, (bool, str, float)):
        return x
    if isinstance(x, int):
        # Hex for huge ints: decimal conversion is capped at 4300 digits (both ends).
        return {"__int__": hex(x)} if x.bit_length() > 14000 else int(x)
    if isinstance(x, list):
        return [enc(v, depth + 1) for v in x]
    if isinstance(x, tuple):
        return {"__tuple__": [enc(v, depth + 1) for v in x]}
    if isinstance(x, (set, frozenset)):
        return {"__set__": sorted((enc(v, depth + 1) for v in x), key=json.dumps)}
    if isinstance(x, dict):
        pairs = [[enc(k, depth + 1), enc(v, depth + 1)] for k, v in x.items()]
        return {"__dict__": sorted(pairs, key=lambda p: json.dumps(p[0]))}
    return {"__repr__": repr(x)[:2000], "__type__": type(x).__name__}


def emit_value(i, value, seconds):
    payload = json.dumps(enc(value))
    if len(payload) > CFG["max_value_chars"]:
        # A big value travels as its digest: equal iff the canonical encodings are equal.
        digest = hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()
        payload = json.dumps({"__digest__": digest, "__type__": type(value).__name__})
    _out.write(NONCE + f'{{"i": {i}, "status": "ok", "t": {seconds!r}, "value": {payload}}}\n')
    _out.flush()


class _Timeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _Timeout()


signal.signal(signal.SIGALRM, _alarm)
ns = {"__name__": "__solution__"}
try:
    with open("solution.py", encoding="utf-8") as f:
        src = f.read()
    signal.setitimer(signal.ITIMER_REAL, CFG["load_timeout"])
    try:
        exec(compile(src, "solution.py", "exec"), ns)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
except _Timeout:
    emit({"load": "timeout"})
    sys.exit(0)
except BaseException as e:
    emit({"load": "error", "error": (type(e).__name__ + ": " + str(e))[:500]})
    sys.exit(0)
fn = ns.get(CFG["fn_name"])
if fn is None and isinstance(ns.get("Solution"), type):
    try:
        fn = getattr(ns["Solution"](), CFG["fn_name"], None)
    except BaseException:
        fn = None
if not callable(fn):
    emit({"load": "missing", "error": "no function " + repr(CFG["fn_name"])})
    sys.exit(0)
emit({"load": "ok"})
for i, (args, limit) in enumerate(zip(CFG["inputs"], CFG["timeouts"])):
    try:
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            start = time.perf_counter()
            value = fn(*args)
            seconds = time.perf_counter() - start
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        emit_value(i, value, seconds)
    except _Timeout:
        emit({"i": i, "status": "timeout"})
    except MemoryError:
        emit({"i": i, "status": "memory"})
    except BaseException as e:
        emit({"i": i, "status": "error", "error": (type(e).__name__ + ": " + str(e))[:300]})
