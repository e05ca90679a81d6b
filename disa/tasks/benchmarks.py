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

from disa.tasks.math_reward import last_boxed

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
]

ANSWER_EXTRACTIONS = ("field", "first_of_list", "last_boxed", "gsm8k")
_MAX_IDS_SHOWN = 20


# --------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------
def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def load_records(path: str | os.PathLike) -> list[dict]:
    """Rows of a ``.jsonl``, ``.json`` (a list, or ``{"data": [...]}``) or ``.parquet`` file;
    ``.jsonl.gz`` / ``.json.gz`` also work. Raises ``FileNotFoundError`` naming the path, and
    ``ValueError`` naming it for a file that cannot be decoded (not UTF-8, a truncated or
    corrupt ``.gz`` or parquet)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"benchmark file not found: {p}")
    try:
        return _read_records(p)
    except (UnicodeDecodeError, EOFError, zlib.error, OSError, pa.ArrowException) as e:
        raise ValueError(f"{p}: could not read the benchmark file ({type(e).__name__}: {e}); "
                         "allowed: UTF-8 jsonl/json (optionally gzip-compressed, whole) or parquet") from e


def _read_records(p: Path) -> list[dict]:
    name = p.name.lower()
    base = name[:-3] if name.endswith(".gz") else name
    if base.endswith(".parquet"):
        if name.endswith(".gz"):
            raise ValueError(f"{p}: gzip-compressed parquet is not supported")
        return pd.read_parquet(p).to_dict(orient="records")
    if base.endswith(".jsonl"):
        rows = []
        with _open_text(p) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{lineno}: invalid JSON: {e}") from e
        return rows
    if base.endswith(".json"):
        with _open_text(p) as f:
            obj = json.load(f)
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if not isinstance(obj, list):
            raise ValueError(f"{p}: expected a JSON list of records or {{'data': [...]}}")
        return obj
    raise ValueError(f"{p}: unknown format (expected .jsonl, .json, .parquet, optionally .gz)")


def load_dataset_records(dataset: str, subset: str | None = None, split: str = "test",
                         revision: str | None = None) -> list[dict]:
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
        raise ImportError(f"dataset={dataset!r} needs the 'datasets' package: pip install 'disa[math]' "
                          "(or give a local jsonl/json/parquet file as path=...)") from e
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
        ds = datasets.load_dataset(str(local) if local.is_dir() else dataset, subset, split=split, revision=revision)
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
            of Python lists. HumanEval-style sets have none: their inputs and canonical
            solution are ``extra_fields`` (see :data:`CODE_BENCHMARKS`).
        extra_fields: further fields copied as columns (e.g. ``entry_point``, ``level``).
        kind: ``"math"`` or ``"code"`` (informational, for the caller's dispatch).
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

    def __post_init__(self) -> None:
        if not (isinstance(self.start, int) and self.start >= 0) or not (
                self.stop is None or (isinstance(self.stop, int) and self.stop > self.start)):
            raise ValueError(f"{self.name}: start={self.start!r}, stop={self.stop!r}; allowed: integers "
                             "0 <= start < stop (stop null: to the end)")
        if (self.path is None) == (self.dataset is None):
            raise ValueError(f"{self.name}: give exactly one of path (a local file) and dataset (a Hugging Face "
                             f"dataset id or directory); got path={self.path!r}, dataset={self.dataset!r}")
        if self.answer_extraction not in ANSWER_EXTRACTIONS:
            raise ValueError(
                f"{self.name}: answer_extraction={self.answer_extraction!r}; "
                f"allowed: {list(ANSWER_EXTRACTIONS)}"
            )
        if self.answer_field is None and self.tests_field is None and self.kind != "code":
            raise ValueError(f"{self.name}: a math benchmark needs an answer_field")
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
    def from_dict(cls, d: Mapping[str, Any]) -> BenchmarkSpec:
        """Build from a config mapping (e.g. a Hydra node converted to a dict)."""
        d = dict(d)
        d.setdefault("path", None)
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"benchmark {d.get('name')!r}: unknown setting(s) {unknown}; "
                             f"allowed: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)

    @property
    def source(self) -> str:
        """Where the records come from, for messages."""
        if self.dataset is None:
            return str(self.path)
        extra = ", ".join(f"{k}={v}" for k, v in [("subset", self.subset), ("split", self.split),
                                                   ("revision", self.revision)] if v)
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

#: Code benchmarks. HumanEval+ (local copy): expected outputs come from running
#: ``canonical_solution`` (see :mod:`disa.tasks.code_reward`). LiveCodeBench / CodeForces
#: in FlowRL's (rllm) format have ``problem`` and ``tests``; not shipped locally.
CODE_BENCHMARKS: dict[str, BenchmarkSpec] = {
    "humanevalplus": BenchmarkSpec(
        "humanevalplus",
        "code/humanevalplus_mini.jsonl.gz",
        "prompt",
        None,
        "task_id",
        kind="code",
        extra_fields=("entry_point", "canonical_solution", "base_input", "plus_input", "atol"),
    ),
    "livecodebench": BenchmarkSpec(
        "livecodebench",
        "code/livecodebench.json",
        "problem",
        None,
        None,
        tests_field="tests",
        kind="code",
    ),
    "codeforces": BenchmarkSpec(
        "codeforces",
        "code/codeforces.json",
        "problem",
        None,
        None,
        tests_field="tests",
        kind="code",
    ),
}


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

    Columns: ``prompt_id`` (``"<name>-<id>"``), ``problem``, ``gold`` (when the spec has an
    answer field), ``tests`` (when it has a tests field), ``benchmark``, and the spec's
    ``extra_fields``. Raises ``FileNotFoundError`` for a missing file and ``ValueError``
    for an empty file, a missing field, duplicate ids, empty problems, or golds/tests that
    cannot be extracted (listing the offending ids).
    """
    if not isinstance(spec, BenchmarkSpec):
        spec = BenchmarkSpec.from_dict(spec)
    spec = spec.resolve(root)
    records = spec.records()[spec.start:spec.stop]
    if not records:
        raise ValueError(f"{spec.name}: no records in {spec.source}"
                         + (f" rows [{spec.start}, {spec.stop})" if spec.start or spec.stop else ""))
    if limit is not None:
        records = records[:limit]

    rows: list[dict[str, Any]] = []
    missing_fields: dict[str, list[str]] = {}
    bad_gold: list[str] = []
    bad_tests: list[str] = []
    empty_problem: list[str] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise ValueError(f"{spec.name}: record {spec.start + i} of {spec.source} is not an object")
        row_no = spec.start + i  # the row of the source, whatever slice was taken
        raw_id = rec.get(spec.id_field) if spec.id_field else row_no
        rid = str(raw_id if raw_id is not None else row_no)
        needed = [spec.problem_field, spec.answer_field, spec.tests_field]
        absent = [f for f in [f for f in needed if f] + list(spec.extra_fields) if f not in rec]
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
            row["gold"] = gold
        if spec.tests_field:
            tests = _parse_tests(rec[spec.tests_field])
            if not tests:
                bad_tests.append(rid)
            row["tests"] = tests
        for f in spec.extra_fields:
            if f not in row:
                row[f] = rec[f]
        rows.append(row)

    where = f"{spec.name} ({spec.source})"
    if missing_fields:
        detail = "; ".join(f"{f!r} in ids {_fmt_ids(ids)}" for f, ids in missing_fields.items())
        raise ValueError(f"{where}: missing field(s): {detail}")
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
    if bad_tests:
        raise ValueError(
            f"{where}: {len(bad_tests)} item(s) with no usable tests "
            f"(field {spec.tests_field!r}): ids {_fmt_ids(bad_tests)}"
        )
    df = pd.DataFrame(rows)
    dup = df.prompt_id[df.prompt_id.duplicated()].tolist()
    if dup:
        raise ValueError(
            f"{where}: duplicate ids {_fmt_ids(dup)} (set id_field=None to use row order)"
        )
    return df


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
