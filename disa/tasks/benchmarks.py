"""Benchmark loading: local files (jsonl / json / parquet) or Hugging Face datasets (a hub id
or a local dataset directory) with a per-benchmark field mapping, gold answers extracted and
checked at load time, and prompt templates.

Public copies of the math benchmarks disagree on fields (``answer`` vs ``final_answer`` as a
list, Minerva's answer only as the last ``\\boxed{}`` of its ``solution``, GSM8K's after
``####``, AMC23's as floats). A :class:`BenchmarkSpec` states where problem, answer and id
live and how the gold is extracted; :func:`load_benchmark` returns a uniform DataFrame
(``prompt_id``, ``problem``, ``gold`` and, for code, ``tests``). A gold that cannot be
extracted is an error listing the items, never an empty string that would silently score 0.

:data:`MATH_BENCHMARKS` holds specs for the usual math sets with paths relative to a
benchmark root (``load_benchmark(MATH_BENCHMARKS["math500"], root=...)``).
"""

from __future__ import annotations

import ast
import gzip
import json
import math
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from disa.tasks.code_layouts import (
    PRELUDES,
    functional_name,
    humaneval_row,
    statement_limits,
    usable_tests,
)
from disa.tasks.math_reward import last_boxed, malformed_gold

__all__ = [
    "ANSWER_EXTRACTIONS",
    "CODE_BENCHMARKS",
    "MATH_BENCHMARKS",
    "PROMPT_TEMPLATES",
    "BenchmarkSpec",
    "benchmark_root",
    "extract_gold",
    "load_benchmark",
    "load_dataset_records",
    "load_records",
    "render_prompt",
    "resolve_entry",
]

ANSWER_EXTRACTIONS = ("field", "first_of_list", "last_boxed", "gsm8k")
KINDS = ("math", "code")
#: stdin/stdout output comparisons (see :func:`disa.tasks.code_reward.outputs_equal`)
OUTPUT_COMPARES = ("tokens", "lines")
_MAX_IDS_SHOWN = 20


# --------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------
def load_records(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSON-lines file, a JSON file (a list, or ``{"data": [...]}``) or a parquet
    file, each optionally gzip-compressed (not parquet). The format is read from the content,
    not the extension: a JSON list saved as ``.jsonl`` (as the rllm code sets are) loads.
    Raises ``FileNotFoundError`` naming the path, and ``ValueError`` naming it for a file
    that cannot be decoded (not UTF-8, invalid JSON, a truncated or corrupt ``.gz`` or
    parquet), with the format it was read as."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"benchmark file not found: {p}")
    try:
        return _read_records(p)
    except (UnicodeDecodeError, EOFError, zlib.error, OSError, pa.ArrowException) as e:
        raise ValueError(
            f"{p}: could not read the benchmark file ({type(e).__name__}: {e}); "
            "allowed: UTF-8 jsonl/json (optionally gzip-compressed, whole) or parquet"
        ) from e


_GZIP_MAGIC, _PARQUET_MAGIC = b"\x1f\x8b", b"PAR1"


def _read_records(p: Path) -> list[dict]:
    with open(p, "rb") as f:
        head = f.read(4)
    if head == _PARQUET_MAGIC:
        return pd.read_parquet(p).to_dict(orient="records")
    if head[:2] == _GZIP_MAGIC:
        with gzip.open(p, "rb") as f:
            if f.read(4) == _PARQUET_MAGIC:
                raise ValueError(f"{p}: gzip-compressed parquet is not supported")
        with gzip.open(p, "rt", encoding="utf-8") as f:
            text = f.read()
    else:
        text = p.read_text(encoding="utf-8")
    return _records_from_text(text, p)


def _records_from_text(text: str, p: Path) -> list[dict]:
    """JSON (a list or ``{"data": [...]}``) when the whole text is one JSON value, else JSON
    lines; the first character decides what an error message calls the file."""
    body = text.lstrip("\ufeff \t\r\n")
    if not body:
        return []
    if body[0] == "[":
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{p}: starts with '[', so it was read as one JSON list (whatever its extension), "
                f"and that is invalid JSON: {e}"
            ) from e
        return obj
    if body[0] != "{":
        raise ValueError(
            f"{p}: unknown format: starts with {body[:20]!r}; allowed: a JSON list, JSON lines "
            '(one object per line), {"data": [...]} or parquet, optionally gzip-compressed'
        )
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        obj = None  # several values: JSON lines
    if isinstance(obj, dict):
        data = obj.get("data")
        return data if isinstance(data, list) else [obj]
    rows = []
    for lineno, line in enumerate(
        body.splitlines(), 1 + text.count("\n", 0, len(text) - len(body))
    ):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{p}:{lineno}: invalid JSON (read as JSON lines, one object per line): {e}"
            ) from e
    return rows


def load_dataset_records(
    dataset: str, subset: str | None = None, split: str = "test", revision: str | None = None
) -> list[dict]:
    """Rows of one split of a Hugging Face dataset.

    ``dataset`` is a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``,
    a local directory of data files (``datasets`` infers the splits from the file names), or
    a hub id (``subset`` is the hub config name; pin ``revision`` for a reproducible table:
    the rows also enter the cache keys, so an unpinned id that changes upstream makes new
    artifacts rather than silently reusing old ones). Needs the ``datasets`` package.
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"dataset={dataset!r} needs the 'datasets' package: pip install 'disa[math]' "
            "(or give a local jsonl/json/parquet file as path=...)"
        ) from e
    where = f"dataset={dataset!r} (subset={subset!r}, split={split!r}, revision={revision!r})"
    local = Path(dataset).expanduser()
    if local.is_dir() and any((local / f).is_file() for f in ("dataset_dict.json", "state.json")):
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{where}: no split {split!r}; allowed: {sorted(ds)}")
            ds = ds[split]
        return ds.to_list()
    try:
        ds = datasets.load_dataset(
            str(local) if local.is_dir() else dataset, subset, split=split, revision=revision
        )
    except Exception as e:  # hub errors come in many types (offline, gated, missing split, ...)
        raise RuntimeError(
            f"could not load {where}: {type(e).__name__}: {e}. Without network access, save the dataset "
            "elsewhere (`datasets.load_dataset(...).save_to_disk(DIR)`) and set dataset=DIR, or give a "
            "local file as path=...; a populated cache also works with HF_DATASETS_OFFLINE=1"
        ) from e
    return ds.to_list()


# --------------------------------------------------------------------------------------
# gold answers
# --------------------------------------------------------------------------------------
_INT_FLOAT = re.compile(r"^[+-]?\d+\.0*$")
_GSM8K = re.compile(r"####\s*(.+?)\s*$", re.S)


def _stringify(value: Any) -> str | None:
    """A scalar gold as a string; ``27.0`` -> ``"27"``; None/NaN/containers -> None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        s = value.strip()
        if _INT_FLOAT.match(s):  # "27.0" -> "27": the same number, without a float look
            s = s.split(".")[0].lstrip("+")
        return s or None
    return None


def _as_list(value: Any) -> list | None:
    if hasattr(value, "tolist") and not isinstance(value, str):  # numpy arrays from parquet
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str) and value.strip().startswith("["):
        try:  # a list stored as its Python/JSON text; literal_eval never executes code
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            return None
        return list(parsed) if isinstance(parsed, (list, tuple)) else None
    return None


def extract_gold(value: Any, how: str) -> str | None:
    """The gold answer string from a raw field value, or ``None`` if there is none.

    ``how``: ``"field"`` (the value itself; integral floats lose their ``.0``),
    ``"first_of_list"`` (element 0 of a list, e.g. OlympiadBench ``final_answer``),
    ``"last_boxed"`` (last ``\\boxed{...}`` in a solution text, braces balanced; Minerva),
    ``"gsm8k"`` (the text after ``####``, thousands separators removed).
    """
    if how == "field":
        return _stringify(value)
    if how == "first_of_list":
        items = _as_list(value)
        return _stringify(items[0]) if items else None
    if how == "last_boxed":
        if not isinstance(value, str):
            return None
        return _stringify(last_boxed(value))
    if how == "gsm8k":
        if not isinstance(value, str):
            return None
        m = _GSM8K.search(value)
        if not m:
            return None
        ans = m.group(1).strip()
        if re.fullmatch(r"[+-]?[\d,]*\d(\.\d+)?", ans):
            ans = ans.replace(",", "")  # "1,450,000" -> "1450000" (a set, to a parser)
        return _stringify(ans)
    raise ValueError(f"answer_extraction={how!r}; allowed: {list(ANSWER_EXTRACTIONS)}")


# --------------------------------------------------------------------------------------
# specs
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives and how its records map to ``problem`` / ``gold`` / ``tests``.

    Attributes:
        name: prefix of every ``prompt_id`` (``"<name>-<id>"``).
        path: the file; relative paths are resolved against the ``root`` given to
            :func:`load_benchmark`. ``None`` when ``dataset`` is given.
        problem_field: field holding the problem statement.
        answer_field: field holding (or containing) the gold answer; ``None`` for code
            benchmarks graded only by tests.
        id_field: field holding a per-item id; ``None`` -> the row index.
        answer_extraction: one of :data:`ANSWER_EXTRACTIONS` (see :func:`extract_gold`).
        tests_field: field holding the tests of a code benchmark (a list, or its JSON text;
            APPS-style ``{"inputs", "outputs"}`` is converted); returned as a ``tests`` column
            of Python lists, with ``fn_name`` for functional tests. HumanEval-style sets have
            none: a code spec without it reads each record as HumanEval+ in either public
            layout (:func:`disa.tasks.code_layouts.humaneval_row`).
        extra_fields: further fields copied as columns (e.g. ``level``).
        kind: ``"math"`` or ``"code"``. A code spec needs no ``answer_field``.
        output_compare: how a stdin/stdout test's output is compared with the expected one:
            ``"tokens"`` (whitespace-separated tokens; numbers within ``float_tolerance``,
            YES/NO in any case: Codeforces checkers) or ``"lines"`` (LiveCodeBench's rule:
            line by line, a line equal as text or as decimals). See
            :func:`disa.tasks.code_reward.outputs_equal`.
        float_tolerance: absolute-or-relative tolerance of real-number tokens (``"tokens"``).
        starter_code_field: field holding starter code (LiveCodeBench); appended to the
            problem, and the function of functional tests is read from it when the tests
            do not name one.
        prelude: code put before every program, by name
            (:data:`disa.tasks.code_layouts.PRELUDES`: ``"livecodebench"``, the imports its
            grader adds).
        limits_from_statement: read each problem's time and memory limits from its statement
            (``Time Limit: 2000 ms``, ``Memory Limit: 256 MB``; CodeForces).
        time_limit_field, memory_limit_field: fields holding each problem's limits (seconds,
            MiB), for layouts that carry them.
        dataset: instead of ``path``: a Hugging Face dataset, as a hub id or a local dataset
            directory (relative ones are tried against ``root`` first); see
            :func:`load_dataset_records`.
        subset: the dataset's config name on the hub (e.g. ``"main"`` for GSM8K).
        split: the split to read (``"test"`` by default).
        revision: a hub commit, tag or branch; pin it for a reproducible table.
        start, stop: the rows ``[start, stop)`` of the source (Python slice semantics,
            before any ``limit``), so that one file can give a training source and a
            disjoint held-out set.
    """

    name: str
    path: str | None
    problem_field: str
    answer_field: str | None = "answer"
    id_field: str | None = None
    answer_extraction: str = "field"
    tests_field: str | None = None
    extra_fields: tuple[str, ...] = ()
    kind: str = "math"
    dataset: str | None = None
    subset: str | None = None
    split: str = "test"
    revision: str | None = None
    start: int = 0
    stop: int | None = None
    output_compare: str = "tokens"
    float_tolerance: float = 1e-6
    starter_code_field: str | None = None
    prelude: str | None = None
    limits_from_statement: bool = False
    time_limit_field: str | None = None
    memory_limit_field: str | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.start, int) and self.start >= 0) or not (
            self.stop is None or (isinstance(self.stop, int) and self.stop > self.start)
        ):
            raise ValueError(
                f"{self.name}: start={self.start!r}, stop={self.stop!r}; allowed: integers "
                "0 <= start < stop (stop null: to the end)"
            )
        if (self.path is None) == (self.dataset is None):
            raise ValueError(
                f"{self.name}: give exactly one of path (a local file) and dataset (a Hugging Face "
                f"dataset id or directory); got path={self.path!r}, dataset={self.dataset!r}"
            )
        if self.answer_extraction not in ANSWER_EXTRACTIONS:
            raise ValueError(
                f"{self.name}: answer_extraction={self.answer_extraction!r}; "
                f"allowed: {list(ANSWER_EXTRACTIONS)}"
            )
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind={self.kind!r}; allowed: {list(KINDS)}")
        if self.answer_field is None and self.kind != "code":
            raise ValueError(
                f"{self.name}: answer_field is missing; allowed: the field of each record holding "
                "the gold answer (a math benchmark is graded against it)"
            )
        if not isinstance(self.problem_field, str) or not self.problem_field:
            raise ValueError(
                f"{self.name}: problem_field={self.problem_field!r}; allowed: the field of each record "
                "holding the problem statement (e.g. 'problem', 'question', 'prompt')"
            )
        if self.output_compare not in OUTPUT_COMPARES:
            raise ValueError(
                f"{self.name}: output_compare={self.output_compare!r}; allowed: {list(OUTPUT_COMPARES)}"
            )
        if self.prelude is not None and self.prelude not in PRELUDES:
            raise ValueError(
                f"{self.name}: prelude={self.prelude!r}; allowed: null or one of {sorted(PRELUDES)}"
            )
        if not (isinstance(self.float_tolerance, (int, float)) and 0 <= self.float_tolerance < 1):
            raise ValueError(
                f"{self.name}: float_tolerance={self.float_tolerance!r}; allowed: a number in [0, 1)"
            )
        object.__setattr__(self, "extra_fields", tuple(self.extra_fields))

    def resolve(self, root: str | os.PathLike | None) -> BenchmarkSpec:
        """A copy whose ``path`` is joined to ``root`` when relative (and ``dataset`` too, when
        it names a directory there)."""
        if self.dataset is not None:
            local = Path(root).expanduser() / self.dataset if root is not None else None
            if local is not None and not Path(self.dataset).is_absolute() and local.is_dir():
                return replace(self, dataset=str(local))
            return self
        p = Path(self.path).expanduser()
        if root is None or p.is_absolute():
            return replace(self, path=str(p))
        return replace(self, path=str(Path(root).expanduser() / p))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, kind: str | None = None) -> BenchmarkSpec:
        """Build from a config mapping (e.g. a Hydra node converted to a dict). ``kind``: the
        task's kind, the default of the mapping's own; a code mapping needs no answer field."""
        d = dict(d)
        name = d.get("name")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"benchmark {name!r}: unknown setting(s) {unknown}; "
                f"allowed: {sorted(cls.__dataclass_fields__)}"
            )
        if not isinstance(name, str) or not name:
            raise ValueError(
                f"benchmark mapping {d}: name is missing; allowed: a name for its prompt ids and metrics"
            )
        if "problem_field" not in d:
            raise ValueError(
                f"benchmark {name!r}: problem_field is missing; allowed: the field of each record "
                "holding the problem statement (e.g. 'problem', 'question', 'prompt')"
            )
        if kind is not None:
            d.setdefault("kind", kind)
        if d.get("kind") == "code":
            d.setdefault("answer_field", None)
        d.setdefault("path", None)
        return cls(**d)

    @property
    def source(self) -> str:
        """Where the records come from, for messages."""
        if self.dataset is None:
            return str(self.path)
        extra = ", ".join(
            f"{k}={v}"
            for k, v in [
                ("subset", self.subset),
                ("split", self.split),
                ("revision", self.revision),
            ]
            if v
        )
        return f"{self.dataset} [{extra}]"

    def records(self) -> list[dict]:
        if self.dataset is not None:
            return load_dataset_records(self.dataset, self.subset, self.split, self.revision)
        return load_records(self.path)


#: Local copies (see ``shared/benchmarks/README.md``); paths relative to the benchmark root.
MATH_BENCHMARKS: dict[str, BenchmarkSpec] = {
    "aime24": BenchmarkSpec("aime24", "math/aime24.jsonl", "problem", "answer", "id"),
    # Not shipped locally; public copy: Zhuofeng-Li/math-evaluation-harness data/aime25/test.jsonl
    "aime25": BenchmarkSpec("aime25", "math/aime25.jsonl", "problem", "answer", None),
    "amc23": BenchmarkSpec("amc23", "math/amc23.jsonl", "problem", "answer", "id"),
    "math500": BenchmarkSpec(
        "math500",
        "math/math500.jsonl",
        "problem",
        "answer",
        "unique_id",
        extra_fields=("subject", "level"),
    ),
    "minerva_math": BenchmarkSpec(
        "minerva_math",
        "math/minerva_math.jsonl",
        "problem",
        "solution",
        "idx",
        answer_extraction="last_boxed",
        extra_fields=("type",),
    ),
    "olympiadbench": BenchmarkSpec(
        "olympiadbench",
        "math/olympiadbench.jsonl",
        "question",
        "final_answer",
        "id",
        answer_extraction="first_of_list",
        extra_fields=("unit", "answer_type"),
    ),
    "gsm8k": BenchmarkSpec(
        "gsm8k", "math/gsm8k.jsonl", "question", "answer", "idx", answer_extraction="gsm8k"
    ),
}

#: Code benchmarks. HumanEval+ (local copy: the evalplus Mini release; OriginFmt loads from the
#: same spec by path): expected outputs are the ``results`` of OriginFmt, else the canonical
#: solution's (see :mod:`disa.tasks.code_reward`). LiveCodeBench / CodeForces in the rllm json
#: layout (FlowRL's test sets) have ``problem`` and ``tests``; not shipped locally.
CODE_BENCHMARKS: dict[str, BenchmarkSpec] = {
    "humanevalplus": BenchmarkSpec(
        "humanevalplus", "code/humanevalplus_mini.jsonl.gz", "prompt", None, "task_id", kind="code"
    ),
    "livecodebench": BenchmarkSpec(
        "livecodebench",
        "code/livecodebench.json",
        "problem",
        None,
        None,
        tests_field="tests",
        kind="code",
        output_compare="lines",
        starter_code_field="starter_code",
        prelude="livecodebench",
    ),
    "codeforces": BenchmarkSpec(
        "codeforces",
        "code/codeforces.json",
        "problem",
        None,
        None,
        tests_field="tests",
        kind="code",
        output_compare="tokens",
        limits_from_statement=True,
    ),
}

#: the source settings of a spec: a mapping that gives one of them replaces all of them
_SOURCE_FIELDS = ("path", "dataset", "subset", "split", "revision")


def resolve_entry(
    entry: str | Mapping[str, Any], known: Mapping[str, BenchmarkSpec], kind: str | None = None
) -> BenchmarkSpec:
    """The spec of one configured benchmark: a built-in name (``known``), or a mapping. A
    mapping whose ``name`` is a built-in, or that names one as ``like``, inherits that spec's
    fields and overrides the ones it sets (``{name: aime24, path: /data/aime24.jsonl}``,
    ``{name: humanevalplus_full, like: humanevalplus, path: ...}``); giving a ``path`` or a
    ``dataset`` replaces the built-in's source. Raises ``ValueError`` naming the benchmark,
    the setting and what is allowed."""
    if isinstance(entry, str):
        if entry not in known:
            raise ValueError(
                f"benchmark {entry!r} is not known; allowed: {sorted(known)}, or a mapping with a name, "
                "a path (or a dataset) and a problem_field"
            )
        return known[entry]
    if not isinstance(entry, Mapping):
        raise ValueError(f"benchmark entry {entry!r}; allowed: a name {sorted(known)} or a mapping")
    entry = dict(entry)
    like = entry.pop("like", None)
    if like is not None and like not in known:
        raise ValueError(
            f"benchmark {entry.get('name')!r}: like={like!r}; allowed: one of {sorted(known)}"
        )
    base = known.get(
        like
        if like is not None
        else entry.get("name")
        if isinstance(entry.get("name"), str)
        else None
    )
    if base is None:
        return BenchmarkSpec.from_dict(entry, kind=kind)
    inherited = {f: getattr(base, f) for f in BenchmarkSpec.__dataclass_fields__}
    if any(k in entry for k in ("path", "dataset")):
        inherited |= {
            "path": None,
            "dataset": None,
            "subset": None,
            "split": "test",
            "revision": None,
        }
    return BenchmarkSpec.from_dict(inherited | entry, kind=kind)


def benchmark_root(default: str | os.PathLike | None = None) -> Path | None:
    """The benchmark root: ``$DISA_BENCHMARKS`` if set, else ``default``."""
    env = os.environ.get("DISA_BENCHMARKS")
    if env:
        return Path(env).expanduser()
    return Path(default).expanduser() if default is not None else None


def _fmt_ids(ids: Sequence[str]) -> str:
    shown = ", ".join(map(str, ids[:_MAX_IDS_SHOWN]))
    more = len(ids) - _MAX_IDS_SHOWN
    return f"[{shown}{f', ... and {more} more' if more > 0 else ''}]"


def _parse_tests(value: Any) -> list | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    items = _as_list(value)
    if items is None and isinstance(value, dict) and "inputs" in value:
        # APPS/TACO layout {"inputs": [...], "outputs": [...], "fn_name"?}
        fn = value.get("fn_name")
        items = [
            {"input": i, "output": o, **({"fn_name": fn} if fn else {})}
            for i, o in zip(value["inputs"], value.get("outputs", []))
        ]
    return items


def load_benchmark(
    spec: BenchmarkSpec | Mapping[str, Any],
    root: str | os.PathLike | None = None,
    *,
    limit: int | None = None,
) -> pd.DataFrame:
    """Load one benchmark as a DataFrame.

    Columns: ``prompt_id`` (``"<name>-<id>"``), ``problem``, ``benchmark``, the spec's
    ``extra_fields``, and by kind: ``gold`` (math: the answer field); ``tests``, ``fn_name``,
    ``output_compare``, ``float_tolerance``, ``prelude`` (code with a tests field);
    ``entry_point``, ``canonical_solution``, ``base_input``, ``plus_input``, ``atol``,
    ``expected`` (HumanEval+ in either layout); ``time_limit_s``, ``memory_limit_mb`` (code: the problem's own limits,
    None where the benchmark states none). Raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` for an empty file, a missing field, duplicate ids, empty problems, or
    golds/tests that cannot be extracted (listing the offending ids).
    """
    if not isinstance(spec, BenchmarkSpec):
        spec = BenchmarkSpec.from_dict(spec)
    spec = spec.resolve(root)
    records = spec.records()[spec.start : spec.stop]
    if not records:
        raise ValueError(
            f"{spec.name}: no records in {spec.source}"
            + (f" rows [{spec.start}, {spec.stop})" if spec.start or spec.stop else "")
        )
    if limit is not None:
        records = records[:limit]
    humaneval = spec.kind == "code" and spec.tests_field is None
    needed = [
        f
        for f in (
            spec.problem_field,
            spec.answer_field,
            spec.tests_field,
            spec.time_limit_field,
            spec.memory_limit_field,
        )
        if f
    ]
    needed += ["entry_point", "canonical_solution"] if humaneval else []

    rows: list[dict[str, Any]] = []
    missing_fields: dict[str, list[str]] = {}
    bad_gold: list[str] = []
    malformed: list[tuple[str, str, str]] = []  # (id, gold, why)
    bad_tests: dict[str, list[str]] = {}  # reason -> ids
    empty_problem: list[str] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise ValueError(
                f"{spec.name}: record {spec.start + i} of {spec.source} is not an object"
            )
        row_no = spec.start + i  # the row of the source, whatever slice was taken
        raw_id = rec.get(spec.id_field) if spec.id_field else row_no
        rid = str(raw_id if raw_id is not None else row_no)
        absent = [f for f in needed + list(spec.extra_fields) if f not in rec]
        for f in absent:
            missing_fields.setdefault(f, []).append(rid)
        if absent:
            continue
        row: dict[str, Any] = {"prompt_id": f"{spec.name}-{rid}", "benchmark": spec.name}
        problem = rec[spec.problem_field]
        # Kept verbatim: for code (HumanEval prompts) trailing newlines/indentation matter.
        row["problem"] = problem
        if not isinstance(problem, str) or not problem.strip():
            empty_problem.append(rid)
        if spec.answer_field:
            gold = extract_gold(rec[spec.answer_field], spec.answer_extraction)
            if not gold:
                bad_gold.append(rid)
            elif malformed_gold(gold):
                malformed.append((rid, gold, malformed_gold(gold)))
            row["gold"] = gold
        if spec.kind == "code":
            why = _code_columns(spec, rec, row)
            if why:
                bad_tests.setdefault(why, []).append(rid)
        for f in spec.extra_fields:
            if f not in row:
                row[f] = rec[f]
        rows.append(row)

    where = f"{spec.name} ({spec.source})"
    if missing_fields:
        detail = "; ".join(f"{f!r} in ids {_fmt_ids(ids)}" for f, ids in missing_fields.items())
        hint = (
            " (a code benchmark's records are HumanEval+ tasks with entry_point and canonical_solution, or "
            "give tests_field for problems with tests)"
            if humaneval
            else ""
        )
        raise ValueError(f"{where}: missing field(s): {detail}{hint}")
    if empty_problem:
        raise ValueError(
            f"{where}: {len(empty_problem)} item(s) with an empty problem "
            f"({spec.problem_field!r}): ids {_fmt_ids(empty_problem)}"
        )
    if bad_gold:
        raise ValueError(
            f"{where}: {len(bad_gold)} item(s) with an empty or unparsable gold answer "
            f"(field {spec.answer_field!r}, extraction {spec.answer_extraction!r}): "
            f"ids {_fmt_ids(bad_gold)}"
        )
    if malformed:
        shown = "; ".join(
            f"{rid}: {gold!r} ({why})" for rid, gold, why in malformed[:_MAX_IDS_SHOWN]
        )
        raise ValueError(
            f"{where}: {len(malformed)} item(s) whose gold answer is malformed LaTeX, which math-verify would "
            f"compare as text and grade every answer wrong against (field {spec.answer_field!r}): {shown}"
            f"{' ...' if len(malformed) > _MAX_IDS_SHOWN else ''}; ids {_fmt_ids([m[0] for m in malformed])}"
        )
    if bad_tests:
        n = sum(map(len, bad_tests.values()))
        detail = "; ".join(f"{why}: ids {_fmt_ids(ids)}" for why, ids in bad_tests.items())
        field = f"field {spec.tests_field!r}" if spec.tests_field else "HumanEval+ inputs"
        raise ValueError(f"{where}: {n} item(s) with no usable tests ({field}): {detail}")
    df = pd.DataFrame(rows)
    dup = df.prompt_id[df.prompt_id.duplicated()].tolist()
    if dup:
        raise ValueError(
            f"{where}: duplicate ids {_fmt_ids(dup)} (set id_field=None to use row order)"
        )
    return df


def _code_columns(spec: BenchmarkSpec, rec: Mapping[str, Any], row: dict[str, Any]) -> str | None:
    """Fill a code row's test columns from ``rec``; the reason its tests are unusable, or None."""
    time_s, memory_mb = (
        statement_limits(row["problem"]) if spec.limits_from_statement else (None, None)
    )
    if spec.time_limit_field:
        time_s = _positive(rec[spec.time_limit_field])
    if spec.memory_limit_field:
        memory_mb = _positive(rec[spec.memory_limit_field])
        memory_mb = int(memory_mb) if memory_mb is not None else None
    row["time_limit_s"], row["memory_limit_mb"] = time_s, memory_mb
    if spec.tests_field is None:  # HumanEval+, either layout
        try:
            row |= humaneval_row(rec)
        except (ValueError, TypeError, json.JSONDecodeError) as e:
            return f"unreadable HumanEval+ inputs ({e})"
        return None if row["base_input"] or row["plus_input"] else "no inputs"
    starter = rec.get(spec.starter_code_field) if spec.starter_code_field else None
    if isinstance(starter, str) and starter.strip() and isinstance(row["problem"], str):
        row["problem"] = (
            f"{row['problem'].rstrip()}\n\nWrite the solution in this starter code:\n"
            f"```python\n{starter.rstrip()}\n```\n"
        )
    tests = _parse_tests(rec[spec.tests_field])
    row["tests"] = tests
    row["fn_name"] = functional_name(tests or [], rec.get("metadata"), starter)
    row["output_compare"], row["float_tolerance"] = spec.output_compare, float(spec.float_tolerance)
    row["prelude"] = spec.prelude
    return usable_tests(tests, row["fn_name"])


def _positive(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and x > 0 else None


# --------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------
#: Built-in prompt templates; ``{problem}`` is replaced by the problem text.
PROMPT_TEMPLATES: dict[str, str] = {
    "boxed": "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}.",
    "answer_colon": (
        "{problem}\nPlease reason step by step. End your response with a final line of the "
        "form 'Answer: <answer>', where <answer> is the final answer."
    ),
    "plain": "{problem}",
}


def render_prompt(problem: str, template: str = "boxed") -> str:
    """The user message for ``problem``: a built-in template name (:data:`PROMPT_TEMPLATES`)
    or a custom template containing ``{problem}``.

    Substitution is a plain string replace, not ``str.format``: problems are full of LaTeX
    braces.
    """
    tpl = PROMPT_TEMPLATES.get(template, template)
    if "{problem}" not in tpl:
        raise ValueError(
            f"template={template!r} is neither one of {sorted(PROMPT_TEMPLATES)} "
            "nor a string containing '{problem}'"
        )
    return tpl.replace("{problem}", problem)
