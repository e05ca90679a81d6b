"""The real-LM study's pieces on SmolLM2 (``experiment=smollm2_sumpairs``): the newline as
the completion's end token, sampled rewards that agree with the enumerated rewarded set,
and a fine-tuned proposal that is stronger than π_ref on the training prompts only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.integration.conftest import INTEGRATION_CACHE, smollm2_cfg

pytestmark = pytest.mark.integration

NEWLINE = 198  # SmolLM2's "\n" (byte-level "Ċ")


@pytest.fixture(scope="module")
def task():
    from disa.tasks.sumpairs import SumPairsTask

    return SumPairsTask(min_sum=4, max_sum=15, test_fraction=0.25, template="fewshot")


@pytest.fixture(scope="module")
def backbone(smollm2_dir, task):
    from omegaconf import OmegaConf

    from disa.cache import Cache
    from disa.models import convert_gguf

    cfg = smollm2_cfg(
        eos_token="\n",
        proposal_sft={
            "seed": 0,
            "corpus_size": 512,
            "p_correct": 1.0,
            "steps": 12,
            "batch_size": 16,
            "lr": 3e-5,
        },
    )
    cfg = OmegaConf.merge(cfg, {"task": {"chat_template": False}})
    return convert_gguf(cfg, Cache(INTEGRATION_CACHE), task)


def test_newline_is_the_end_token_everywhere(backbone, smollm2_dir):
    from transformers import AutoConfig, GenerationConfig

    from disa.tokenization import load_tokenizer

    tok = load_tokenizer(backbone.ref_path)
    assert tok.eos_token_id == NEWLINE and tok.pad_token_id == 2  # padding keeps <|im_end|>
    assert AutoConfig.from_pretrained(backbone.ref_path).eos_token_id == NEWLINE
    assert GenerationConfig.from_pretrained(backbone.ref_path).eos_token_id == NEWLINE
    assert load_tokenizer(smollm2_dir).eos_token_id == 2  # the plain conversion is untouched
    assert backbone.ref_path != smollm2_dir


def _exact_p_correct(model, tok, task, prompts):
    from disa.oracle import log_p_correct, rewarded_logprobs

    table = rewarded_logprobs(model, tok, task, prompts, batch_size=64)
    return np.exp(log_p_correct(table)), table


def test_sampled_rewards_agree_with_the_rewarded_set(backbone, task):
    """What the sampler draws, the reward grades and the oracle enumerates are one set: a
    completion is rewarded iff it is ``answer + "\\n"`` for an enumerated answer, and then its
    log-prob is the oracle's for that answer (canonical tokens) — so exact P(correct) is the
    mass the sampler puts on rewarded completions."""
    from disa.models import load_model
    from disa.sampling import SamplerSettings
    from disa.sampling.hf import HFSampler
    from disa.scoring import sequence_logprobs
    from disa.tokenization import completion_text, encode_prompt, load_tokenizer

    tok, model = load_tokenizer(backbone.proposal_path), load_model(backbone.proposal_path)
    prompts = task.prompts("train")
    p_ids = [encode_prompt(tok, p) for p in prompts.prompt]
    groups = HFSampler(batch_size=256).sample(
        model, tok, p_ids, 16, SamplerSettings(max_new_tokens=10), seed=0
    )
    p_exact, table = _exact_p_correct(model, tok, task, prompts)
    rows, prompt_ids, completions = [], [], []
    for (_, row), p, group in zip(prompts.iterrows(), p_ids, groups):
        for c in group:
            assert c[-1] == NEWLINE or len(c) == 10
            rows.append(row)
            prompt_ids.append(p)
            completions.append(c)
    texts = [completion_text(tok, c) for c in completions]
    import pandas as pd

    reward = task.rewards(pd.DataFrame(rows), texts)
    answers = {
        (r.prompt_id, a): lp for r, a, lp in zip(table.itertuples(), table.answer, table.logp)
    }
    scored = sequence_logprobs(
        model, prompt_ids, completions, tok.pad_token_id, batch_size=64
    ).numpy()
    canonical = 0
    for row, c, text, r, lp in zip(rows, completions, texts, reward, scored):
        in_set = (row.prompt_id, text) in answers and c[-1] == NEWLINE
        assert bool(r) == in_set, (text, r)
        if r and c == tok(text, add_special_tokens=False).input_ids + [NEWLINE]:
            canonical += 1
            assert lp == pytest.approx(answers[(row.prompt_id, text)], abs=1e-4)
    # measured: 6 of 144 (12-step proposal)
    assert reward.sum() >= 3 and canonical >= 0.9 * reward.sum()
    # the sampled frequency of reward matches the exact mass (binomial 4-σ band)
    n, p = len(reward), float(np.mean(p_exact))
    assert abs(reward.mean() - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-3


def test_fine_tuned_proposal_is_stronger_on_training_prompts(backbone, task):
    from disa.models import load_model
    from disa.tokenization import load_tokenizer

    def p_correct(path, split):
        tok = load_tokenizer(path)
        return float(np.mean(_exact_p_correct(load_model(path), tok, task, task.prompts(split))[0]))

    with torch.no_grad():
        ref, prop = (
            p_correct(backbone.ref_path, "train"),
            p_correct(backbone.proposal_path, "train"),
        )
    assert prop > 1.5 * ref, (ref, prop)  # measured: 0.099 against 0.051 after 12 steps
    assert (
        backbone.proposal_fingerprint and backbone.proposal_fingerprint != backbone.ref_fingerprint
    )
