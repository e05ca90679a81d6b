"""The sumpairs task and the exact oracle, against brute force."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_llama

from disa.oracle import log_p_correct, rewarded_logprobs
from disa.tasks.sumpairs import SumPairsTask
from disa.tokenization import SPECIAL_TOKENS, build_char_tokenizer, completion_text

ALPHABET = SumPairsTask.alphabet


# -- reward ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("target", "text", "ok"),
    [
        (7, "3+4", True),
        (7, "0+7", True),
        (7, "7+0", True),
        (0, "0+0", True),
        (10, "10+0", True),
        (7, "7", False),
        (7, "03+4", False),
        (7, "3+04", False),
        (7, "00+7", False),
        (0, "00+0", False),
        (7, " 3+4", False),
        (7, "3+4 ", False),
        (7, "3 + 4", False),
        (7, "3+4\n", False),
        (7, "3+3", False),
        (7, "+7", False),
        (7, "7+", False),
        (7, "3+4+0", False),
        (7, "-1+8", False),
        (7, "", False),
        (7, "3+4=", False),
        (7, "４+3", False),
    ],
)
def test_reward(target, text, ok):
    task = SumPairsTask(max_sum=20)
    prompts = pd.DataFrame(
        {"prompt_id": [f"sum-{target}"], "prompt": [f"{target}="], "target": [target]}
    )
    assert task.rewards(prompts, [text]).tolist() == [float(ok)]
    assert SumPairsTask().is_correct(target, text) is ok


def test_rewarded_set_complete_and_rewarded():
    task = SumPairsTask(max_sum=12)
    for _, row in pd.concat([task.prompts("train"), task.prompts("test")]).iterrows():
        s = task.rewarded_set(row)
        n = int(row.target)
        assert len(s) == len(set(s)) == n + 1
        assert task.rewards(pd.DataFrame([row] * len(s)), s).tolist() == [1.0] * (n + 1)
        # brute force: every "a+b" string with a, b in 0..2n-ish that is rewarded is in the set
        brute = {f"{a}+{b}" for a in range(30) for b in range(30) if task.is_correct(n, f"{a}+{b}")}
        assert brute == set(s)


@pytest.mark.parametrize(
    ("min_sum", "max_sum", "frac", "seed"), [(0, 59, 0.25, 0), (3, 11, 0.3, 5), (0, 1, 0.5, 1)]
)
def test_split_disjoint_and_covering(min_sum, max_sum, frac, seed):
    task = SumPairsTask(min_sum=min_sum, max_sum=max_sum, test_fraction=frac, split_seed=seed)
    train, test = task.prompts("train"), task.prompts("test")
    assert set(train.prompt_id).isdisjoint(test.prompt_id)
    assert sorted(train.target.tolist() + test.target.tolist()) == list(range(min_sum, max_sum + 1))
    assert len(test) == max(1, round(frac * (max_sum - min_sum + 1)))
    assert all(p == f"{t}=" for p, t in zip(train.prompt, train.target))
    assert train.prompt_id.is_unique and test.prompt_id.is_unique
    # deterministic given the seed
    pd.testing.assert_frame_equal(test, SumPairsTask(min_sum, max_sum, frac, seed).prompts("test"))
    with pytest.raises(ValueError, match="split"):
        task.prompts("validation")


# -- pre-training corpus -------------------------------------------------------------------
def test_corpus_pairs_are_prompts_and_completions():
    """The embedded backbone learns π(o|q) from these pairs: each prompt is one the pipeline
    asks, as it asks it; each completion an answer, correct when ``p_correct`` is 1."""
    task = SumPairsTask(max_sum=12)
    target = {row.prompt: row.target for row in _all_prompts(task).itertuples()}
    clean = task.corpus(np.random.default_rng(0), 300, p_correct=1.0)
    assert len(clean) == 300 and set(target) == {p for p, _ in clean}  # every n, test ones too
    assert all(task.is_correct(target[p], c) for p, c in clean)
    noisy = task.corpus(np.random.default_rng(0), 300, p_correct=0.0)
    assert all(p in target and re.fullmatch(r"[0-9]+\+[0-9]+", c) for p, c in noisy)
    assert not all(task.is_correct(target[p], c) for p, c in noisy)
    assert all(set(p + c) <= set(ALPHABET) for p, c in clean + noisy)


# -- exact oracle ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sum_tok():
    return build_char_tokenizer(ALPHABET)


@pytest.fixture(scope="module")
def sum_model(sum_tok):
    return tiny_llama(
        len(sum_tok),
        seed=3,
        init_std=0.2,
        special=(sum_tok.pad_token_id, sum_tok.bos_token_id, sum_tok.eos_token_id),
    )


@pytest.fixture(scope="module")
def small_task():
    return SumPairsTask(min_sum=0, max_sum=3, test_fraction=0.25)


def _all_prompts(task):
    return pd.concat([task.prompts("train"), task.prompts("test")], ignore_index=True)


@torch.no_grad()
def test_rewarded_logprobs_match_naive_teacher_forcing(sum_model, sum_tok, small_task):
    prompts = _all_prompts(small_task)
    table = rewarded_logprobs(sum_model, sum_tok, small_task, prompts, batch_size=3)
    assert len(table) == 1 + 2 + 3 + 4
    eos = sum_tok.eos_token_id
    char_id = {ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(ALPHABET)}
    for row in table.itertuples():
        n = int(row.prompt_id.split("-")[1])
        p = [sum_tok.bos_token_id] + [char_id[ch] for ch in f"{n}="]
        c = [char_id[ch] for ch in row.answer] + [eos]
        logits = sum_model(input_ids=torch.tensor([p + c])).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        want = sum(float(lp[len(p) - 1 + j, t]) for j, t in enumerate(c))
        assert row.logp == pytest.approx(want, abs=1e-5), row
    lpc = log_p_correct(table)
    for pid, g in table.groupby("prompt_id"):
        assert lpc[pid] == pytest.approx(math.log(sum(math.exp(v) for v in g.logp)), abs=1e-12)
        assert lpc[pid] < 0


def test_log_p_correct_closed_forms_order_and_extremes():
    # groups in order of first appearance (not sorted: "sum-10" < "sum-2" < "sum-5"), values
    # whose exp underflows even in float64, and a spread of 800 that a shift by anything but
    # the max would overflow
    table = pd.DataFrame(
        {
            "prompt_id": ["sum-5", "sum-10", "sum-5", "sum-2", "sum-10", "sum-2"],
            "answer": ["0+5", "0+10", "1+4", "0+2", "1+9", "1+1"],
            "logp": [-1000.0, 0.0, -1000.0 - math.log(3), -7.5, -800.0, -7.5],
        }
    )
    lpc = log_p_correct(table)
    assert lpc.index.tolist() == ["sum-5", "sum-10", "sum-2"]
    assert lpc["sum-5"] == pytest.approx(-1000.0 + math.log(4 / 3), abs=1e-12)  # e^a (1 + 1/3)
    assert lpc["sum-10"] == 0.0  # log(1 + e^-800)
    assert lpc["sum-2"] == pytest.approx(-7.5 + math.log(2), abs=1e-12)
    assert log_p_correct(table.iloc[[3]])["sum-2"] == -7.5  # a single answer is its own log-prob


@torch.no_grad()
def test_rewarded_logprobs_batches_and_progress(
    sum_model, sum_tok, small_task, monkeypatch, capsys
):
    # batch_size and progress reach the scorer: 10 rewarded pairs in batches of ≤ 4, a bar
    # labelled as asked
    import disa.scoring as scoring

    sizes = []
    token_logprobs_ = scoring.token_logprobs

    def spy(model, batch, **kw):
        sizes.append(batch.input_ids.shape[0])
        return token_logprobs_(model, batch, **kw)

    monkeypatch.setattr(scoring, "token_logprobs", spy)
    prompts = _all_prompts(small_task)
    table = rewarded_logprobs(
        sum_model, sum_tok, small_task, prompts, batch_size=4, progress="oracle pairs"
    )
    assert sizes == [4, 4, 2] and len(table) == 10
    assert "oracle pairs" in capsys.readouterr().err
    rewarded_logprobs(sum_model, sum_tok, small_task, prompts.iloc[:1])
    assert capsys.readouterr().err == ""  # no bar unless asked


@torch.no_grad()
def _prefix_tree(model, prompt: list[int], vocab: int, eos: int, depth: int):
    """P(prefix) and next-token distributions for every EOS-free prefix of length ≤ depth."""
    non_eos = [t for t in range(vocab) if t != eos]
    probs: dict[tuple, float] = {(): 1.0}
    nxt: dict[tuple, np.ndarray] = {}
    for length in range(depth + 1):
        level = list(itertools.product(non_eos, repeat=length))
        ids = torch.tensor([prompt + list(s) for s in level])
        dist = torch.softmax(model(input_ids=ids).logits[:, -1].double(), -1).numpy()
        for s, d in zip(level, dist):
            nxt[s] = d
            if length < depth:
                for t in non_eos:
                    probs[(*s, t)] = probs[s] * d[t]
    return probs, nxt, non_eos


def _enumerate(model, tok, prompt_text, max_new):
    eos = tok.eos_token_id
    prompt = tok(prompt_text).input_ids
    probs, nxt, non_eos = _prefix_tree(model, prompt, len(tok), eos, max_new - 1)
    finished = {(*s, eos): p * nxt[s][eos] for s, p in probs.items()}  # ends at EOS
    truncated = {
        (*s, t): p * nxt[s][t] for s, p in probs.items() if len(s) == max_new - 1 for t in non_eos
    }
    return finished, truncated


def _text_strict(tok, ids) -> str | None:
    """The completion as characters, or None if it holds any special token but a final EOS."""
    ids = list(ids)
    if ids and ids[-1] == tok.eos_token_id:
        ids = ids[:-1]
    if any(i < len(SPECIAL_TOKENS) for i in ids):
        return None
    return "".join(ALPHABET[i - len(SPECIAL_TOKENS)] for i in ids)


@pytest.fixture(scope="module")
def enumerated(sum_model, sum_tok, small_task):
    """Per prompt: (oracle log P(correct), every completion of ≤ 4 tokens with its probability)."""
    prompts = _all_prompts(small_task)
    lpc = log_p_correct(rewarded_logprobs(sum_model, sum_tok, small_task, prompts))
    return {
        row.prompt_id: (
            row.target,
            lpc[row.prompt_id],
            *_enumerate(sum_model, sum_tok, row.prompt, 4),
        )
        for row in prompts.itertuples()
    }


def test_p_correct_equals_brute_force_enumeration(enumerated, sum_tok, small_task):
    """Over every completion of ≤ 3 tokens + EOS (all 16 tokens): the total is 1, and the
    mass of rewarded ones (no special token but the final EOS) is the oracle's P(correct)."""
    assert len(enumerated) == 4
    for target, lpc, finished, truncated in enumerated.values():
        assert sum(finished.values()) + sum(truncated.values()) == pytest.approx(1.0, abs=1e-9)
        p = sum(
            pr
            for ids, pr in finished.items()
            if (t := _text_strict(sum_tok, ids)) is not None and small_task.is_correct(target, t)
        )
        assert 0 < p <= 1
        assert math.exp(lpc) == pytest.approx(p, rel=1e-5)


def test_p_correct_is_the_probability_the_pipeline_rewards(enumerated, sum_tok, small_task):
    """The exact log Z must be the one of the reward the pipeline actually assigns to
    sampled completions (``disa.sampling.completion_text`` → ``task.rewards``): over every
    completion a sampler with max_new_tokens=4 can return (special tokens included), the
    rewarded mass is the oracle's P(correct). Decoding with ``skip_special_tokens=True``
    would reward e.g. ``1 <pad> + 2 <eos>`` or a capped ``1 + 2 <bos>``, which the oracle's
    rewarded set (answer + EOS) does not contain."""
    assert (
        completion_text(
            sum_tok, sum_tok("1+2", add_special_tokens=False).input_ids + [sum_tok.eos_token_id]
        )
        == "1+2"
    )
    for pid, (target, lpc, finished, truncated) in enumerated.items():
        p = 0.0
        for ids, pr in itertools.chain(finished.items(), truncated.items()):
            # cheap pre-filter: only sequences whose characters spell a rewarded answer can be
            # rewarded; the pipeline's own text function decides
            chars = "".join(
                ALPHABET[i - len(SPECIAL_TOKENS)] for i in ids if i >= len(SPECIAL_TOKENS)
            )
            if small_task.is_correct(target, chars) and small_task.is_correct(
                target, completion_text(sum_tok, list(ids))
            ):
                p += pr
        assert math.exp(lpc) == pytest.approx(p, rel=1e-5), pid


# -- the few-shot format (a pretrained LM's) ------------------------------------------------
def test_fewshot_prompts_rewards_and_rewarded_set():
    """Same rule as the compact format in the spacing of the worked lines: the rewarded set
    is exactly the rewarded strings (brute force), a compact answer is not rewarded there,
    and the prompt ends where the completion starts."""
    task = SumPairsTask(min_sum=3, max_sum=14, template="fewshot")
    for _, row in pd.concat([task.prompts("train"), task.prompts("test")]).iterrows():
        n = int(row.target)
        assert row.prompt.endswith(f"\n{n} =") and row.prompt.startswith("12 = 5 + 7\n")
        s = task.rewarded_set(row)
        brute = {
            f" {a} + {b}" for a in range(30) for b in range(30) if task.is_correct(n, f" {a} + {b}")
        }
        assert brute == set(s) and len(s) == n + 1
        assert task.rewards(pd.DataFrame([row] * len(s)), s).tolist() == [1.0] * (n + 1)
    for text in ["0+3", " 0 + 3\n", " 0 +3", " 00 + 3", "0 + 3", " 1 + 3"]:
        assert not task.is_correct(3, text), text
    assert task.is_correct(3, " 0 + 3")
    # only the compact format keeps the spec (and the cache keys) it always had
    assert "template" not in SumPairsTask().spec() and task.spec()["template"] == "fewshot"
    with pytest.raises(ValueError, match="task.template='chat'.*allowed"):
        SumPairsTask(template="chat")


def test_corpus_of_the_training_split_only():
    """A proposal fine-tuned on answers sees the training prompts only, never a held-out one."""
    task = SumPairsTask(min_sum=3, max_sum=30, template="fewshot")
    train = set(task.prompts("train").prompt)
    pairs = task.corpus(np.random.default_rng(1), 500, p_correct=1.0, split="train")
    assert {p for p, _ in pairs} == train
    target = {row.prompt: row.target for row in task.prompts("train").itertuples()}
    assert all(task.is_correct(target[p], c) for p, c in pairs)
