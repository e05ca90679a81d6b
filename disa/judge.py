"""LLM-as-judge strategy diversity.

For each prompt, a judge model reads the problem and k responses (typically the k correct
ones) and rates how many *distinct solution strategies* they use, on a 1–5 scale:

    1 = all k responses use essentially the same strategy
    5 = every response uses a different strategy

**Scaling to k.** A rating ``s`` maps linearly to an estimated number of distinct
strategies among the k responses,

    distinct = 1 + (s - 1) / 4 * (k - 1)        (s=1 -> 1 strategy, s=5 -> k strategies)

and ``distinct_fraction = distinct / k``. The raw rating is kept in ``score``; ``distinct``
is comparable across prompts with different k, the raw rating is not.

Judges are pluggable (:class:`Judge`: anything with ``complete(prompt) -> str``):
:class:`OpenAICompatibleJudge` (any ``/v1/chat/completions`` endpoint — vLLM, OpenAI, ...;
through the ``openai`` SDK, the ``judge`` extra) and :class:`HFJudge` (a local transformers
model, loaded lazily).

A failed call or an unparsable judgement is recorded as **missing** (NaN ``score`` and a
``judge_error``) and counted by :func:`summarize_judgements`; it is never replaced by a
default score.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from disa.tokenization import encode_prompt

__all__ = [
    "HFJudge",
    "Judge",
    "JudgeError",
    "OpenAICompatibleJudge",
    "build_judge",
    "build_judge_prompt",
    "distinct_from_score",
    "judge_diversity",
    "judge_metrics",
    "parse_judgement",
    "summarize_judgements",
]

SCORE_MIN, SCORE_MAX = 1, 5

_RUBRIC = """You are evaluating the diversity of solution strategies.

Below is a problem and {k} responses to it. Judge how many genuinely DIFFERENT solution
strategies the responses use. Two responses use the same strategy if they rely on the same
key idea or method, even when their wording, notation, variable names, order of steps or
level of detail differ. Ignore whether the responses are correct.

Rate on a scale from 1 to 5:
1 = all responses use essentially the same strategy
2 = mostly the same strategy; minor variations in approach
3 = a few distinct strategies (roughly half of the responses repeat another's strategy)
4 = mostly distinct strategies; only a few responses share one
5 = every response uses a different strategy

## Problem
{problem}

{responses}

First, in a few sentences, name the strategy of each response. Then give your rating on the
final line, exactly in the form:
Score: <1-5>"""


class JudgeError(RuntimeError):
    """A judge call failed (network, HTTP status, malformed response)."""


@runtime_checkable
class Judge(Protocol):
    """A judge model: one prompt in, one completion out. Raise on failure."""

    def complete(self, prompt: str) -> str: ...


# --------------------------------------------------------------------------------------
# prompt and parsing
# --------------------------------------------------------------------------------------
def _truncate(text: str, max_chars: int) -> str:
    text = text.strip()
    if max_chars and len(text) > max_chars:
        # Keep head and tail: the strategy is stated early, the conclusion at the end.
        head = max_chars * 2 // 3
        tail = max_chars - head
        return text[:head] + "\n[... truncated ...]\n" + text[-tail:]
    return text


def build_judge_prompt(
    problem: str, responses: Sequence[str], max_chars_per_response: int = 4000
) -> str:
    """The judge prompt for ``problem`` and its ``responses`` (each truncated to
    ``max_chars_per_response`` characters, keeping head and tail; 0 = no truncation)."""
    if not responses:
        raise ValueError("need at least one response")
    blocks = [
        f"## Response {i}\n{_truncate(r, max_chars_per_response)}"
        for i, r in enumerate(responses, 1)
    ]
    return _RUBRIC.format(k=len(responses), problem=problem.strip(), responses="\n\n".join(blocks))


_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_SCORE_PATTERNS = [
    # "Score: 4", "**Score:** 4", "score = 4/5", "Rating: 4 out of 5", "Final score - 4"
    re.compile(
        r"(?i)\b(?:final\s+)?(?:score|rating)\b[\s*_]*(?:[:=\-]|is)[\s*_]*"
        r"\**\s*\[*\s*([0-9]+(?:\.[0-9]+)?)\s*\]*\s*(?:/\s*5|out\s+of\s+5)?"
    ),
    re.compile(r"\[\[\s*([0-9]+(?:\.[0-9]+)?)\s*\]\]"),  # "[[4]]"
    re.compile(r'"score"\s*:\s*"?([0-9]+(?:\.[0-9]+)?)'),  # {"score": 4}
]


def _to_score(token: str) -> int | None:
    try:
        value = float(token)
    except ValueError:
        return None
    if not value.is_integer():
        return None  # "3.5": the rubric asks for an integer; do not guess a rounding
    s = int(value)
    return s if SCORE_MIN <= s <= SCORE_MAX else None


def parse_judgement(text: str | None) -> int | None:
    """The 1–5 rating in a judge's reply, or ``None`` if there is none or it is out of range.

    Takes the *last* explicit ``Score:``/``Rating:`` (also ``**Score:** 4``, ``score = 4/5``,
    ``[[4]]``, ``{"score": 4}``); a reply that is only a number also counts. Reasoning in
    ``<think>...</think>`` is ignored (it may quote the rubric's numbers).
    """
    if not text:
        return None
    body = _THINK.sub(" ", text)
    if "<think>" in body.lower():  # an unclosed think block: no final answer was written
        body = body[: body.lower().index("<think>")]
    for pattern in _SCORE_PATTERNS:
        matches = pattern.findall(body)
        if matches:
            return _to_score(matches[-1])
    bare = body.strip().strip("*.").strip()
    if re.fullmatch(r"[0-9]+(?:\.0+)?", bare):
        return _to_score(bare)
    return None


def distinct_from_score(score: float, k: int) -> float:
    """Estimated number of distinct strategies among ``k`` responses from a 1–5 rating:
    ``1 + (score - 1) / 4 * (k - 1)``; NaN for a missing score."""
    if score is None or (isinstance(score, float) and math.isnan(score)):
        return float("nan")
    return 1.0 + (float(score) - SCORE_MIN) / (SCORE_MAX - SCORE_MIN) * (k - 1)


# --------------------------------------------------------------------------------------
# judges
# --------------------------------------------------------------------------------------
class OpenAICompatibleJudge:
    """A judge behind an OpenAI-compatible chat-completions endpoint, called through the
    ``openai`` SDK (``pip install 'disa[judge]'``; vLLM brings it too).

    ``base_url`` is the API root including the version, e.g. ``http://localhost:8000/v1``
    (vLLM's ``vllm serve``) or ``https://api.openai.com/v1``. The key is read from the
    environment variable ``api_key_env`` at each call (never stored on the judge, never
    logged); without one the placeholder ``EMPTY`` is sent, as local servers that check no
    key expect. The SDK retries transient failures (connection errors, HTTP 408, 409, 429 and
    5xx) ``retries`` times with exponential backoff that honours ``Retry-After``; a failure
    that remains raises :class:`JudgeError`.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 120.0,
        *,
        temperature: float = 0.0,
        max_tokens: int = 1024,
        retries: int = 2,
        system_prompt: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.retries = retries
        self.system_prompt = system_prompt
        self.extra_body = dict(extra_body or {})

    def __repr__(self) -> str:
        return f"OpenAICompatibleJudge(base_url={self.base_url!r}, model={self.model!r})"

    def complete(self, prompt: str) -> str:
        try:
            import openai
        except ImportError as e:
            raise ImportError(
                "the OpenAI-compatible judge needs the 'judge' extra: pip install 'disa[judge]'"
            ) from e
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": prompt})
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        where = f"{self.base_url}/chat/completions"
        try:
            with openai.OpenAI(
                base_url=self.base_url,
                api_key=key or "EMPTY",
                timeout=self.timeout,
                max_retries=self.retries,
            ) as client:
                reply = client.chat.completions.create(
                    model=self.model,
                    messages=messages,
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                    extra_body=self.extra_body or None,
                )
        except openai.APIStatusError as e:
            raise JudgeError(f"HTTP {e.status_code} from {where}: {str(e)[:300]}") from e
        except openai.APIConnectionError as e:  # timeouts included
            raise JudgeError(f"request to {where} failed: {e}") from e
        except openai.OpenAIError as e:  # a response that does not decode
            raise JudgeError(f"malformed response from {where}: {str(e)[:300]}") from e
        try:
            content = reply.choices[0].message.content
        except (AttributeError, IndexError, TypeError) as e:
            raise JudgeError(f"malformed response from {where}: {str(reply)[:300]}") from e
        if not isinstance(content, str):
            raise JudgeError(f"no text content in the response from {where}")
        return content


class HFJudge:
    """A local Hugging Face causal LM as judge; model and tokenizer load on first use.

    Greedy decoding by default (``temperature=0``). The prompt is wrapped in the tokenizer's
    chat template when it has one. Not thread-safe: use ``workers=1`` in
    :func:`judge_diversity`.
    """

    def __init__(
        self,
        model_path: str,
        *,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        device: str | None = None,
        dtype: str = "auto",
        max_input_tokens: int | None = None,
    ) -> None:
        self.model_path = model_path
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.device = device
        self.dtype = dtype
        self.max_input_tokens = max_input_tokens
        self._model = None
        self._tok = None

    def __repr__(self) -> str:
        return f"HFJudge({self.model_path!r})"

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(self.model_path)
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)
        self._model = (
            AutoModelForCausalLM.from_pretrained(self.model_path, torch_dtype=dtype)
            .to(device)
            .eval()
        )

    def complete(self, prompt: str) -> str:
        import torch

        if self._model is None:
            self._load()
        tok, model = self._tok, self._model
        ids = torch.tensor([encode_prompt(tok, prompt, chat=True)])
        if self.max_input_tokens and ids.shape[1] > self.max_input_tokens:
            raise JudgeError(f"judge prompt has {ids.shape[1]} tokens > {self.max_input_tokens}")
        ids = ids.to(model.device)
        mask = torch.ones_like(ids)  # one unpadded sequence
        sample = self.temperature > 0
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=self.max_new_tokens,
                do_sample=sample,
                temperature=self.temperature if sample else None,
                top_p=None,
                top_k=None,
                pad_token_id=pad,
            )
        return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


# --------------------------------------------------------------------------------------
# running the judge
# --------------------------------------------------------------------------------------
def _items(items: Iterable[Mapping[str, Any]] | pd.DataFrame) -> list[dict[str, Any]]:
    if isinstance(items, pd.DataFrame):
        return items.to_dict(orient="records")
    return [dict(it) for it in items]


def judge_diversity(
    judge: Judge,
    items: Iterable[Mapping[str, Any]] | pd.DataFrame,
    *,
    max_chars_per_response: int = 4000,
    workers: int = 1,
    min_responses: int = 2,
) -> pd.DataFrame:
    """Strategy-diversity judgements, one row per item.

    ``items``: records (or a DataFrame) with ``prompt_id``, ``problem`` and ``responses``
    (a list of strings, e.g. the correct responses to the prompt). Items with fewer than
    ``min_responses`` responses are not sent (diversity is undefined) and come back missing.

    Columns: ``prompt_id``, ``k``, ``score`` (1–5, NaN when missing), ``distinct``
    (estimated number of distinct strategies, see the module docstring),
    ``distinct_fraction`` (``distinct / k``), ``judge_error`` (``None`` when scored), ``raw``
    (the judge's reply, ``None`` when the call failed). ``workers`` > 1 sends requests
    concurrently (HTTP judges; keep 1 for :class:`HFJudge`).
    """
    records = _items(items)

    def one(rec: dict[str, Any]) -> dict[str, Any]:
        responses = [str(r) for r in (rec.get("responses") or [])]
        k = len(responses)
        row: dict[str, Any] = {
            "prompt_id": rec.get("prompt_id"),
            "k": k,
            "score": np.nan,
            "judge_error": None,
            "raw": None,
        }
        if k < min_responses:
            row["judge_error"] = f"only {k} response(s); need >= {min_responses}"
            return row
        prompt = build_judge_prompt(str(rec.get("problem", "")), responses, max_chars_per_response)
        try:
            raw = judge.complete(prompt)
        except Exception as e:  # recorded as missing, counted, never a default score
            row["judge_error"] = f"{type(e).__name__}: {e}"[:500]
            return row
        row["raw"] = raw
        score = parse_judgement(raw)
        if score is None:
            row["judge_error"] = "unparsable judgement"
        else:
            row["score"] = float(score)
        return row

    if workers > 1 and len(records) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            rows = list(pool.map(one, records))
    else:
        rows = [one(r) for r in records]
    df = pd.DataFrame(rows, columns=["prompt_id", "k", "score", "judge_error", "raw"])
    df["score"] = df["score"].astype(float)
    df["distinct"] = [distinct_from_score(s, k) for s, k in zip(df["score"], df["k"])]
    df["distinct_fraction"] = df["distinct"] / df["k"].where(df["k"] > 0)
    return df[["prompt_id", "k", "score", "distinct", "distinct_fraction", "judge_error", "raw"]]


def summarize_judgements(df: pd.DataFrame) -> dict[str, float | int]:
    """Means over the scored items only, with the number of missing ones.

    Returns ``n``, ``n_scored``, ``n_missing``, ``mean_score``, ``mean_distinct``,
    ``mean_distinct_fraction`` (NaN when nothing was scored).
    """
    scored = df["score"].notna()
    n_scored = int(scored.sum())

    def mean(col: str) -> float:
        return float(df.loc[scored, col].mean()) if n_scored else float("nan")

    return {
        "n": len(df),
        "n_scored": n_scored,
        "n_missing": int(len(df) - n_scored),
        "mean_score": mean("score"),
        "mean_distinct": mean("distinct"),
        "mean_distinct_fraction": mean("distinct_fraction"),
    }


def build_judge(judge_cfg) -> Judge:
    """The judge an ``eval.judge`` config names (``kind``: ``openai`` or ``hf``)."""
    if judge_cfg.kind == "openai":
        return OpenAICompatibleJudge(
            judge_cfg.base_url,
            judge_cfg.model,
            api_key_env=judge_cfg.get("api_key_env", "OPENAI_API_KEY"),
        )
    if judge_cfg.kind == "hf":
        return HFJudge(judge_cfg.model)
    raise ValueError(f"eval.judge.kind={judge_cfg.kind!r}; allowed: ['openai', 'hf']")


def judge_metrics(
    judge: Judge,
    samples: pd.DataFrame,
    problems: pd.DataFrame,
    max_chars: int = 4000,
    workers: int = 1,
) -> dict[str, float]:
    """Strategy diversity of each evaluation prompt's k responses (``samples``: ``prompt_id,
    text``) to its problem (``problems``: ``prompt_id`` and ``problem`` or ``prompt``).
    Failed or unparsable judgements are counted in ``judge_missing`` and left out of the
    means; with none scored, no mean is reported."""
    problems = problems.set_index("prompt_id")
    column = "problem" if "problem" in problems else "prompt"
    items = [
        {"prompt_id": pid, "problem": problems.loc[pid, column], "responses": g.text.tolist()}
        for pid, g in samples.groupby("prompt_id", sort=False)
    ]
    s = summarize_judgements(
        judge_diversity(judge, items, max_chars_per_response=max_chars, workers=workers)
    )
    out = {"judge_missing": s["n_missing"], "judge_scored": s["n_scored"]}
    if s["n_scored"]:
        out |= {
            "judge_score": s["mean_score"],
            "judge_distinct_fraction": s["mean_distinct_fraction"],
        }
    return out
