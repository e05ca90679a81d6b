"""LLM-as-judge strategy diversity: prompt, parsing, judges (a local OpenAI-compatible HTTP
server, a tiny HF model), and failures recorded as missing."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from disa.judge import (
    HFJudge,
    Judge,
    JudgeError,
    OpenAICompatibleJudge,
    build_judge_prompt,
    distinct_from_score,
    judge_diversity,
    parse_judgement,
    summarize_judgements,
)

ITEMS = [
    {"prompt_id": "p1", "problem": "Add 2 and 3.", "responses": ["2+3=5", "3+2=5", "count up"]},
    {"prompt_id": "p2", "problem": "Sort [3,1].", "responses": ["bubble", "merge"]},
    {"prompt_id": "p3", "problem": "Only one.", "responses": ["just one"]},
]


# -- prompt and parsing ------------------------------------------------------------------
def test_build_judge_prompt():
    long = "start " + "x" * 5000 + " end"
    p = build_judge_prompt("What is 1+1?", ["two", long], max_chars_per_response=300)
    assert "What is 1+1?" in p and "## Response 1\ntwo" in p and "## Response 2" in p
    assert "2 responses" in p and "Score: <1-5>" in p
    assert "[... truncated ...]" in p and "start" in p and "end" in p
    assert len(p) < 3000
    with pytest.raises(ValueError):
        build_judge_prompt("q", [])


@pytest.mark.parametrize(
    "text,want",
    [
        ("Response 1 uses algebra...\nScore: 4", 4),
        ("**Score:** 3", 3),
        ("score = 2/5", 2),
        ("Rating: 5 out of 5", 5),
        ("The final score is 1.", 1),
        ("[[4]]", 4),
        ('{"score": 2, "reason": "same method"}', 2),
        ("3", 3),
        ("4.0", 4),
        ("Score: 2\n...on reflection...\nScore: 5", 5),  # the last one counts
        ("<think>maybe Score: 1</think>Score: 3", 3),
        ("<think>Score: 4 ... (cut off)", None),
        ("Score: 7", None),
        ("Score: 0", None),
        ("Score: 3.5", None),
        ("Score: <1-5>", None),
        ("I cannot decide.", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_judgement(text, want):
    assert parse_judgement(text) == want


def test_distinct_scaling():
    assert distinct_from_score(1, 8) == 1.0
    assert distinct_from_score(5, 8) == 8.0
    assert distinct_from_score(3, 5) == 3.0
    assert math.isnan(distinct_from_score(float("nan"), 4))


# -- a local OpenAI-compatible server ------------------------------------------------------
class _Server:
    def __init__(
        self,
        status: int = 200,
        reply: str = "Strategies differ.\nScore: 4",
        first: tuple[int, ...] = (),
    ):
        self.status, self.reply = status, reply
        self.first = list(first)  # statuses of the first requests (429 carries Retry-After: 1)
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(
                    {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
                )
                if self.path != "/v1/chat/completions":
                    self.send_response(404)
                    self.end_headers()
                    return
                status = outer.first.pop(0) if outer.first else outer.status
                if status != 200:
                    self.send_response(status)
                    if status == 429:
                        self.send_header("Retry-After", "1")
                    self.end_headers()
                    self.wfile.write(b"server error")
                    return
                payload = json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": outer.reply}}]}
                )
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload.encode())

            def log_message(self, *args):  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.close()


def test_openai_compatible_judge(server, monkeypatch):
    monkeypatch.setenv("DISA_TEST_JUDGE_KEY", "sk-test")
    judge = OpenAICompatibleJudge(
        server.url, "judge-model", api_key_env="DISA_TEST_JUDGE_KEY", timeout=10
    )
    assert isinstance(judge, Judge)
    df = judge_diversity(judge, ITEMS, workers=2)
    assert list(df.columns) == [
        "prompt_id",
        "k",
        "score",
        "distinct",
        "distinct_fraction",
        "judge_error",
        "raw",
    ]
    assert df.score.tolist()[:2] == [4.0, 4.0]
    assert math.isnan(df.score.iloc[2]) and "need >= 2" in df.judge_error.iloc[2]
    assert df.distinct.iloc[0] == pytest.approx(1 + 3 / 4 * 2)
    assert len(server.requests) == 2  # the one-response item is never sent
    req = server.requests[0]
    assert req["body"]["model"] == "judge-model"
    assert req["body"]["messages"][-1]["role"] == "user"
    assert req["auth"] == "Bearer sk-test"
    summary = summarize_judgements(df)
    assert summary["n"] == 3 and summary["n_scored"] == 2 and summary["n_missing"] == 1
    assert summary["mean_score"] == 4.0


def test_no_key_sends_the_placeholder_only(server, monkeypatch):
    monkeypatch.delenv("DISA_TEST_JUDGE_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-this-one")  # another variable is never read
    judge = OpenAICompatibleJudge(server.url, "m", api_key_env="DISA_TEST_JUDGE_KEY")
    assert parse_judgement(judge.complete("hi")) == 4
    assert server.requests[0]["auth"] == "Bearer EMPTY"
    assert "sk-" not in repr(judge) and not any("sk-" in str(v) for v in vars(judge).values())


def test_failing_endpoint_gives_missing_scores():
    s = _Server(status=500)
    try:
        judge = OpenAICompatibleJudge(s.url, "m", retries=1, timeout=5)
        with pytest.raises(JudgeError, match="HTTP 500"):
            judge.complete("x")
        assert len(s.requests) == 2  # retried once by the SDK
        df = judge_diversity(judge, ITEMS[:2])
    finally:
        s.close()
    assert df.score.isna().all()
    assert df.judge_error.str.contains("HTTP 500").all()
    assert df.raw.isna().all()
    summary = summarize_judgements(df)
    assert summary["n_missing"] == 2 and summary["n_scored"] == 0
    assert math.isnan(summary["mean_score"])  # never a default score


def test_rate_limit_waits_as_the_server_asks():
    """HTTP 429 with Retry-After: 1 is retried after the second the server asked for."""
    import time

    s = _Server(first=(429,))
    try:
        start = time.monotonic()
        assert (
            parse_judgement(OpenAICompatibleJudge(s.url, "m", retries=2, timeout=5).complete("x"))
            == 4
        )
        waited = time.monotonic() - start
    finally:
        s.close()
    assert len(s.requests) == 2 and waited >= 0.9


def test_unreachable_and_unparsable_are_missing():
    s = _Server()
    url = s.url
    s.close()  # nothing listens there any more
    judge = OpenAICompatibleJudge(url, "m", retries=0, timeout=2)
    df = judge_diversity(judge, ITEMS[:1])
    assert df.score.isna().all() and "failed" in df.judge_error.iloc[0]

    s = _Server(reply="These are all rather similar.")
    try:
        df = judge_diversity(OpenAICompatibleJudge(s.url, "m"), ITEMS[:2])
    finally:
        s.close()
    assert df.score.isna().all()
    assert (df.judge_error == "unparsable judgement").all()
    assert df.raw.iloc[0] == "These are all rather similar."


def test_custom_judge_and_dataframe_input():
    class Flaky:
        def __init__(self):
            self.calls = 0

        def complete(self, prompt: str) -> str:
            self.calls += 1
            if self.calls == 2:
                raise TimeoutError("judge timed out")
            return "Score: 5"

    df = judge_diversity(Flaky(), pd.DataFrame(ITEMS[:2] * 2))
    assert df.score.isna().tolist() == [False, True, False, False]
    assert "TimeoutError" in df.judge_error.iloc[1]
    s = summarize_judgements(df)
    assert s["n_missing"] == 1 and s["mean_score"] == 5.0
    assert s["mean_distinct_fraction"] == pytest.approx((1.0 + 1.0 + 1.0) / 3)


def test_hf_judge_with_tiny_model(tmp_path):
    pytest.importorskip("transformers")
    from conftest import tiny_llama

    from disa.tokenization import build_char_tokenizer

    tok = build_char_tokenizer("abcdef")
    model = tiny_llama(len(tok), special=(tok.pad_token_id, tok.bos_token_id, tok.eos_token_id))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    judge = HFJudge(str(tmp_path), max_new_tokens=4, device="cpu", dtype="float32")
    out = judge.complete("abc")
    assert isinstance(out, str)
    df = judge_diversity(judge, [{"prompt_id": "p", "problem": "a", "responses": ["ab", "cd"]}])
    # A random model writes no score: missing, with the reason recorded.
    assert df.score.isna().all() and df.judge_error.iloc[0] == "unparsable judgement"
