"""Benchmark loading: formats, field mappings, gold extraction and checks, prompt templates."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from disa.tasks.benchmarks import (
    CODE_BENCHMARKS,
    MATH_BENCHMARKS,
    BenchmarkSpec,
    extract_gold,
    load_benchmark,
    load_records,
    render_prompt,
)


def _bench_root() -> Path | None:
    env = os.environ.get("DISA_BENCHMARKS")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
    return root if root.is_dir() else None


@pytest.fixture(scope="module")
def bench_root() -> Path:
    root = _bench_root()
    if root is None:
        pytest.skip("local benchmark copies not present (set DISA_BENCHMARKS)")
    return root


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# -- the local math benchmarks -----------------------------------------------------------
@pytest.mark.parametrize(
    "name,count",
    [
        ("aime24", 30),
        ("amc23", 40),
        ("math500", 500),
        ("minerva_math", 272),
        ("olympiadbench", 675),
        ("gsm8k", 1319),
    ],
)
def test_local_math_benchmarks_load(bench_root, name, count):
    df = load_benchmark(MATH_BENCHMARKS[name], root=bench_root)
    assert len(df) == count
    assert {"prompt_id", "problem", "gold"} <= set(df.columns)
    assert df.prompt_id.is_unique
    assert df.prompt_id.str.startswith(f"{name}-").all()
    assert df.gold.map(lambda g: isinstance(g, str) and g.strip() != "").all()
    assert df.problem.map(lambda p: isinstance(p, str) and p.strip() != "").all()


def test_local_gold_formats(bench_root):
    amc = load_benchmark(MATH_BENCHMARKS["amc23"], root=bench_root)
    assert amc.gold.iloc[0] == "27"  # stored as the float 27.0
    assert not amc.gold.str.endswith(".0").any()
    olymp = load_benchmark(MATH_BENCHMARKS["olympiadbench"], root=bench_root)
    assert olymp.gold.iloc[0] == "2"  # final_answer == ["2"]
    minerva = load_benchmark(MATH_BENCHMARKS["minerva_math"], root=bench_root)
    assert minerva.gold.iloc[0] == "1.6"  # last \boxed{} of the solution
    gsm = load_benchmark(MATH_BENCHMARKS["gsm8k"], root=bench_root)
    assert gsm.gold.iloc[0] == "18"
    assert gsm.gold.str.fullmatch(r"-?\d+(\.\d+)?").all()  # thousands separators removed
    aime = load_benchmark(MATH_BENCHMARKS["aime24"], root=bench_root)
    assert aime.gold.str.fullmatch(r"\d+").all()


def test_aime25_not_shipped_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="aime25.jsonl"):
        load_benchmark(MATH_BENCHMARKS["aime25"], root=tmp_path)


def test_humanevalplus_loads(bench_root):
    df = load_benchmark(CODE_BENCHMARKS["humanevalplus"], root=bench_root)
    assert len(df) == 164
    assert df.prompt_id.iloc[0] == "humanevalplus-HumanEval/0"
    # Prompts stay verbatim: prompt + canonical_solution must still be a program.
    assert df.problem.iloc[0].endswith("\n")
    compile(df.problem.iloc[0] + df.canonical_solution.iloc[0], "he0", "exec")


# -- load_records formats ---------------------------------------------------------------
ROWS = [{"id": 1, "problem": "1+1?", "answer": "2"}, {"id": 2, "problem": "2+2?", "answer": 4}]


def test_load_records_formats(tmp_path):
    jl = _write_jsonl(tmp_path / "a.jsonl", ROWS)
    assert load_records(jl) == ROWS
    gz = tmp_path / "a.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    assert load_records(gz) == ROWS
    (tmp_path / "b.json").write_text(json.dumps(ROWS))
    assert load_records(tmp_path / "b.json") == ROWS
    (tmp_path / "c.json").write_text(json.dumps({"data": ROWS}))
    assert load_records(tmp_path / "c.json") == ROWS
    with gzip.open(tmp_path / "c.json.gz", "wt") as f:
        f.write(json.dumps({"data": ROWS}))
    assert load_records(tmp_path / "c.json.gz") == ROWS
    pd.DataFrame([{**r, "answer": str(r["answer"])} for r in ROWS]).to_parquet(
        tmp_path / "d.parquet"
    )
    assert [r["problem"] for r in load_records(tmp_path / "d.parquet")] == ["1+1?", "2+2?"]


def test_load_records_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_records(tmp_path / "bad.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown format"):
        load_records(tmp_path / "x.csv")


def test_empty_dataset_raises_naming_path(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    spec = BenchmarkSpec("e", "empty.jsonl", "problem", "answer")
    with pytest.raises(ValueError, match="empty.jsonl"):
        load_benchmark(spec, root=tmp_path)


# -- gold extraction ---------------------------------------------------------------------
def test_last_boxed_nested_braces():
    sol = (
        r"First \boxed{1} is wrong. So $x=\boxed{\frac{\sqrt{3}}{2}}\mathrm{~m}$ and "
        r"the set is \boxed{\{1, 2\}}."
    )
    assert extract_gold(sol, "last_boxed") == r"\{1, 2\}"
    assert extract_gold(sol.rsplit(" and", 1)[0], "last_boxed") == r"\frac{\sqrt{3}}{2}"
    assert extract_gold(r"\boxed{a^{2}+b_{1}}", "last_boxed") == "a^{2}+b_{1}"
    assert extract_gold("no box here", "last_boxed") is None
    assert extract_gold(r"\boxed{\frac{1}{2}", "last_boxed") is None  # unclosed


def test_extract_gold_modes():
    assert extract_gold(27.0, "field") == "27"
    assert extract_gold(0.5, "field") == "0.5"
    assert extract_gold("27.0", "field") == "27"
    assert extract_gold(" 3 ", "field") == "3"
    assert extract_gold(float("nan"), "field") is None
    assert extract_gold(None, "field") is None
    assert extract_gold(["$\\frac{1}{2}$"], "first_of_list") == "$\\frac{1}{2}$"
    assert extract_gold("['7']", "first_of_list") == "7"
    assert extract_gold([], "first_of_list") is None
    assert extract_gold("so 3 + 4 = 7\n#### 1,450,000", "gsm8k") == "1450000"
    assert extract_gold("no marker", "gsm8k") is None
    with pytest.raises(ValueError, match="allowed"):
        extract_gold("x", "weird")


def test_unparsable_gold_raises_listing_ids(tmp_path):
    rows = [
        {"idx": 0, "problem": "p0", "solution": r"so \boxed{3}"},
        {"idx": 1, "problem": "p1", "solution": "no boxed answer"},
        {"idx": 2, "problem": "p2", "solution": r"\boxed{}"},
        {"idx": 3, "problem": "p3", "solution": r"\boxed{4}"},
    ]
    _write_jsonl(tmp_path / "m.jsonl", rows)
    spec = BenchmarkSpec(
        "m", "m.jsonl", "problem", "solution", "idx", answer_extraction="last_boxed"
    )
    with pytest.raises(ValueError) as e:
        load_benchmark(spec, root=tmp_path)
    msg = str(e.value)
    assert "2 item(s)" in msg and "[1, 2]" in msg and "last_boxed" in msg


def test_unparsable_gold_ids_truncated(tmp_path):
    rows = [{"id": i, "q": f"p{i}", "final_answer": []} for i in range(50)]
    _write_jsonl(tmp_path / "o.jsonl", rows)
    spec = BenchmarkSpec(
        "o", "o.jsonl", "q", "final_answer", "id", answer_extraction="first_of_list"
    )
    with pytest.raises(ValueError, match=r"50 item\(s\).*19, \.\.\. and 30 more"):
        load_benchmark(spec, root=tmp_path)


def test_missing_field_and_duplicates(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", ROWS + [{"id": 3, "problem": "x"}])
    with pytest.raises(ValueError, match="missing field.*'answer' in ids \\[3\\]"):
        load_benchmark(BenchmarkSpec("a", "a.jsonl", "problem", "answer", "id"), root=tmp_path)
    _write_jsonl(tmp_path / "d.jsonl", [ROWS[0], ROWS[0]])
    with pytest.raises(ValueError, match="duplicate ids"):
        load_benchmark(BenchmarkSpec("d", "d.jsonl", "problem", "answer", "id"), root=tmp_path)
    df = load_benchmark(BenchmarkSpec("d", "d.jsonl", "problem", "answer"), root=tmp_path)
    assert df.prompt_id.tolist() == ["d-0", "d-1"]  # id_field=None: row index


def test_spec_from_dict_and_code_tests(tmp_path):
    tests = [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]
    (tmp_path / "lcb.json").write_text(
        json.dumps(
            [{"problem": "add", "tests": json.dumps(tests)}, {"problem": "add2", "tests": tests}]
        )
    )
    spec = {
        "name": "lcb",
        "path": "lcb.json",
        "problem_field": "problem",
        "answer_field": None,
        "tests_field": "tests",
        "kind": "code",
    }
    df = load_benchmark(spec, root=tmp_path)
    assert df.tests.tolist() == [tests, tests]
    assert "gold" not in df.columns
    (tmp_path / "bad.json").write_text(json.dumps([{"problem": "x", "tests": []}]))
    with pytest.raises(ValueError, match="no usable tests"):
        load_benchmark({**spec, "path": "bad.json"}, root=tmp_path)
    with pytest.raises(ValueError, match="answer_extraction"):
        BenchmarkSpec("x", "x.jsonl", "problem", "answer", answer_extraction="regex")


# -- prompts -----------------------------------------------------------------------------
def test_render_prompt():
    p = render_prompt(r"Find $x$ if $\{x\} = 1$.", "boxed")
    assert p.startswith(r"Find $x$ if $\{x\} = 1$.")
    assert p.endswith("put your final answer within \\boxed{}.")
    assert "Answer: <answer>" in render_prompt("q", "answer_colon")
    assert render_prompt("q", "Q: {problem}\nA:") == "Q: q\nA:"
    with pytest.raises(ValueError, match="template"):
        render_prompt("q", "nonsense")


# -- Hugging Face datasets -------------------------------------------------------------------
_GSM8K_ROWS = [
    {"question": "What is 2+3?", "answer": "2+3=5\n#### 5"},
    {"question": "What is 4*4?", "answer": "4*4=16\n#### 16"},
    {"question": "Half of 10?", "answer": "#### 5"},
]


def test_dataset_saved_to_disk(tmp_path):
    """A ``save_to_disk`` directory (what a machine without network is given), both a
    ``DatasetDict`` (split chosen) and a single ``Dataset``; relative to the root."""
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(_GSM8K_ROWS),
            "test": datasets.Dataset.from_list(_GSM8K_ROWS[:1]),
        }
    ).save_to_disk(tmp_path / "gsm8k")
    spec = {
        "name": "gsm",
        "dataset": "gsm8k",
        "split": "train",
        "problem_field": "question",
        "answer_field": "answer",
        "id_field": None,
        "answer_extraction": "gsm8k",
    }
    df = load_benchmark(spec, root=tmp_path)
    assert df.prompt_id.tolist() == ["gsm-0", "gsm-1", "gsm-2"]
    assert df.gold.tolist() == ["5", "16", "5"]
    assert df.problem.tolist() == [r["question"] for r in _GSM8K_ROWS]
    with pytest.raises(ValueError, match=r"no split 'validation'; allowed: \['test', 'train'\]"):
        load_benchmark({**spec, "split": "validation"}, root=tmp_path)

    datasets.Dataset.from_list(_GSM8K_ROWS[1:]).save_to_disk(tmp_path / "single")
    df = load_benchmark({**spec, "dataset": str(tmp_path / "single")})
    assert df.gold.tolist() == ["16", "5"]


def test_dataset_directory_of_data_files(tmp_path):
    """A local directory of data files: ``datasets`` infers the split from the file name."""
    pytest.importorskip("datasets")
    (tmp_path / "bench").mkdir()
    pd.DataFrame(_GSM8K_ROWS).to_parquet(tmp_path / "bench" / "test.parquet")
    spec = {
        "name": "gsm",
        "dataset": str(tmp_path / "bench"),
        "problem_field": "question",
        "answer_field": "answer",
        "id_field": None,
        "answer_extraction": "gsm8k",
    }
    assert load_benchmark(spec).gold.tolist() == ["5", "16", "5"]


def test_dataset_hub_id_arguments_and_failure(monkeypatch):
    """A hub id goes to ``datasets.load_dataset`` with subset, split and revision (a recording
    test double stands in for the hub here); a failure names the dataset and the way out."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name=None, *, split=None, revision=None):
        calls.append((path, name, split, revision))
        if path == "org/missing":
            raise ConnectionError("offline")
        return datasets.Dataset.from_list(_GSM8K_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    spec = {
        "name": "gsm",
        "dataset": "openai/gsm8k",
        "subset": "main",
        "split": "train",
        "revision": "abc123",
        "problem_field": "question",
        "answer_field": "answer",
        "id_field": None,
        "answer_extraction": "gsm8k",
    }
    assert load_benchmark(spec, root="/nonexistent", limit=2).gold.tolist() == ["5", "16"]
    assert calls == [("openai/gsm8k", "main", "train", "abc123")]
    with pytest.raises(
        RuntimeError, match=r"could not load dataset='org/missing'.*ConnectionError.*save_to_disk"
    ):
        load_benchmark({**spec, "dataset": "org/missing"})


def test_spec_needs_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one of path .* and dataset"):
        BenchmarkSpec.from_dict({"name": "x", "problem_field": "q"})
    with pytest.raises(ValueError, match="exactly one of path .* and dataset"):
        BenchmarkSpec.from_dict(
            {"name": "x", "path": "a.jsonl", "dataset": "org/x", "problem_field": "q"}
        )
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['splt'\]"):
        BenchmarkSpec.from_dict(
            {"name": "x", "dataset": "org/x", "splt": "test", "problem_field": "q"}
        )


def test_row_slices_give_disjoint_sources(tmp_path):
    """``start``/``stop`` select source rows before ``limit``; ids without an id field are the
    source row numbers, so a training slice and a held-out slice never share one."""
    rows = [{"q": f"What is {i}+1?", "a": f"#### {i + 1}"} for i in range(10)]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {
        "path": "g.jsonl",
        "problem_field": "q",
        "answer_field": "a",
        "id_field": None,
        "answer_extraction": "gsm8k",
    }
    train = load_benchmark({"name": "g", **base, "stop": 6}, root=tmp_path)
    test = load_benchmark({"name": "g", **base, "start": 6}, root=tmp_path, limit=3)
    assert train.prompt_id.tolist() == [f"g-{i}" for i in range(6)]
    assert test.prompt_id.tolist() == ["g-6", "g-7", "g-8"] and test.gold.tolist() == [
        "7",
        "8",
        "9",
    ]
    with pytest.raises(ValueError, match=r"no records in .* rows \[20, None\)"):
        load_benchmark({"name": "g", **base, "start": 20}, root=tmp_path)
    with pytest.raises(ValueError, match=r"start=5, stop=5; allowed: integers 0 <= start < stop"):
        BenchmarkSpec.from_dict({"name": "g", **base, "start": 5, "stop": 5})


# -- malformed golds ------------------------------------------------------------------------------
def test_malformed_golds_stop_the_load_with_their_ids(tmp_path):
    # not LaTeX, but complete: kept
    rows = [
        {"id": "ok", "problem": "p", "answer": r"\frac{1}{2}"},
        {"id": "cut", "problem": "p", "answer": r"\frac{"},
        {"id": "closing", "problem": "p", "answer": "1}"},
        {"id": "left", "problem": "p", "answer": r"\left( 1, 2"},
        {"id": "text", "problem": "p", "answer": "62.5%"},
    ]
    _write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(ValueError) as e:
        load_benchmark(BenchmarkSpec("m", "m.jsonl", "problem", "answer", "id"), root=tmp_path)
    msg = str(e.value)
    assert (
        "3 item(s) whose gold answer is malformed LaTeX" in msg
        and "ids [cut, closing, left]" in msg
    )
    assert "cut: '\\\\frac{' (1 brace(s) never closed)" in msg


def test_no_gold_of_the_six_local_math_sets_is_malformed(bench_root):
    """The rule refuses no real gold: every gold of AIME24, AMC23, MATH500, Minerva,
    OlympiadBench and GSM8K is well-formed (each loads; the load refuses malformed ones)."""
    from disa.tasks.math_reward import malformed_gold

    for name in ("aime24", "amc23", "math500", "minerva_math", "olympiadbench", "gsm8k"):
        df = load_benchmark(MATH_BENCHMARKS[name], root=bench_root)
        assert [g for g in df.gold if malformed_gold(g)] == [], name
