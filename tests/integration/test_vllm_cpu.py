"""vLLM on SmolLM2-135M-Instruct through the harness's sampler (``-m integration``; the CPU
build runs in the venv of ``make setup-vllm``: ``make test-integration VENV=.venv-vllm``).

(a) the same seed gives the same completions on the CPU build, which takes no per-request
seeds; (b) vLLM's log-probs of its own samples agree with the scorer's within
``sampler.logprob_tolerance``; (c) after a weight sync (the whole model perturbed, and a
LoRA policy with nonzero B) the engine's log-probs of fixed completions are the updated
policy's, far from the old ones; (d) two GRPO steps of the online module sample through the
engine and sync it after each update.

One engine serves the whole module (start-up is most of the cost on a CPU); a test that
pushes other weights into it pushes π_ref's back when it ends.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import REPO

pytestmark = pytest.mark.integration

HINT = "vLLM's CPU build: make setup-vllm, then make test-integration VENV=.venv-vllm"
FEW_SHOT = "12 = 5 + 7\n20 = 11 + 9\n9 = 0 + 9\n31 = 16 + 15\n{n} ="
#: fixed completions (SmolLM2 tokens) for the log-prob checks of (c)
FIXED = [" 3 + 4\n", " 10 + 8\n", " 1 + 1\n", " 7 + 0\n"]


def _vllm_importable() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install (e.g. a CUDA torchvision) is skipped the same way
        return False
    return True


@pytest.fixture(scope="module")
def tolerance() -> float:
    """The per-token tolerance the score stage applies with sampler=vllm."""
    return float(OmegaConf.load(REPO / "conf/sampler/vllm.yaml").logprob_tolerance)


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    """SmolLM2's tokenizer with "\\n" as EOS: a few-shot answer is one line (the samplers
    stop at the tokenizer's EOS; the checkpoint's own ``<|im_end|>`` is not used)."""
    from disa.tokenization import load_tokenizer

    t = load_tokenizer(smollm2_dir)
    t.eos_token = t.convert_ids_to_tokens(198)
    assert t.eos_token_id == 198 and t.pad_token_id == 2
    return t


@pytest.fixture(scope="module")
def ref(smollm2_dir):
    from disa.models import load_model

    return load_model(smollm2_dir, "float32").eval()


@pytest.fixture(scope="module")
def sampler(smollm2_dir):
    if not _vllm_importable():
        pytest.skip(f"vllm is not importable here; {HINT}")
    from disa.sampling.vllm import VLLMSampler

    s = VLLMSampler(batch_size=256, seed=0, max_model_len=256)
    if not s.cpu:
        pytest.skip(
            "these checks are for vLLM's CPU build (on a GPU requests are seeded one by one)"
        )
    yield s
    s.close()


def _prompts(tok, count: int) -> list[list[int]]:
    return [tok(FEW_SHOT.format(n=2 + 3 * i)).input_ids for i in range(count)]


def _scored_tokens(model, prompts, completions, pad_id, **how) -> list[np.ndarray]:
    from disa.scoring import pack, token_logprobs

    batch = pack(prompts, completions, pad_id)
    with torch.no_grad():
        lp = token_logprobs(model, batch, **how)
    return [lp[i, : len(c)].double().numpy() for i, c in enumerate(completions)]


def _engine_tokens(sampler, prompts, completions) -> list[np.ndarray]:
    """The engine's (raw, temperature 1) log-prob of each token of fixed completions, from
    its prompt log-probs of prompt + completion."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
    out = sampler._engine.generate(
        [{"prompt_token_ids": list(p) + list(c)} for p, c in zip(prompts, completions)],
        params,
        use_tqdm=False,
    )
    rows = []
    for p, c, r in zip(prompts, completions, out):
        steps = r.prompt_logprobs[len(p) :]
        rows.append(np.array([step[t].logprob for t, step in zip(c, steps)], dtype=np.float64))
    return rows


def _max_gap(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(max(np.abs(x - y).max() for x, y in zip(a, b)))


# -- (a) determinism -------------------------------------------------------------------------------
def test_same_seed_same_completions(sampler, ref, tok):
    from disa.sampling import SamplerSettings

    prompts = _prompts(tok, 8)
    how = SamplerSettings(temperature=1.0, max_new_tokens=8)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = sampler.sample(ref, tok, prompts, 4, how, seed=7)
    # the caller's random stream is left alone
    assert torch.equal(torch.random.get_rng_state(), state)
    again = sampler.sample(ref, tok, prompts, 4, how, seed=7)
    other = sampler.sample(ref, tok, prompts, 4, how, seed=8)
    assert first == again
    assert first != other
    flat = [c for g in first for c in g]
    assert len(flat) == 32 and len(set(map(tuple, flat))) > 4  # really sampled, not greedy
    assert all(c[-1] == tok.eos_token_id or len(c) == 8 for c in flat)


# -- (b) one log-prob truth ------------------------------------------------------------------------
@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (1.0, 20, 0.9)])
def test_engine_logprobs_match_the_scorer(sampler, ref, tok, tolerance, temperature, top_k, top_p):
    from disa.sampling import SamplerSettings
    from disa.sampling.vllm import check_agreement, logprob_agreement

    prompts = _prompts(tok, 16)
    how = SamplerSettings(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=8)
    groups = sampler.sample(ref, tok, prompts, 8, how, seed=0)
    completions = [c for g in groups for c in g]
    reps = [p for p in prompts for _ in range(8)]
    engine = [np.array(lp) for g in sampler.last_token_logprobs for lp in g]
    scored = _scored_tokens(
        ref, reps, completions, tok.pad_token_id, temperature=temperature, top_k=top_k, top_p=top_p
    )
    assert all(len(e) == len(c) for e, c in zip(engine, completions))
    # nothing vLLM drew is outside the scorer's top-k/top-p set
    assert all(np.isfinite(s).all() for s in scored)
    gap = _max_gap(engine, scored)
    assert gap < tolerance, (
        f"max per-token gap {gap:.2e} at T={temperature}, top_k={top_k}, top_p={top_p}"
    )
    summed = [lp for g in sampler.last_logprobs for lp in g]
    check_agreement(
        {
            "ref": logprob_agreement(
                summed, [s.sum() for s in scored], [len(c) for c in completions]
            )
        },
        tolerance,
    )


# -- (c) weight sync -------------------------------------------------------------------------------
def _fixed(tok, count=4):
    prompts = _prompts(tok, count)
    completions = [tok(c, add_special_tokens=False).input_ids for c in FIXED[:count]]
    return prompts, completions


def _check_sync(sampler, ref, policy, tok, tolerance) -> dict[str, float]:
    """Push ``policy`` into the engine; its log-probs of fixed completions must be the
    policy's (scorer) and far from π_ref's. Then π_ref goes back in."""
    from disa.sampling import SamplerSettings

    prompts, completions = _fixed(tok)
    sampler.sync(ref)
    before = _engine_tokens(sampler, prompts, completions)
    old = _scored_tokens(ref, prompts, completions, tok.pad_token_id)
    seconds = sampler.sync(policy)
    after = _engine_tokens(sampler, prompts, completions)
    new = _scored_tokens(policy, prompts, completions, tok.pad_token_id)
    figures = {
        "sync_s": seconds,
        "engine_vs_old_before": _max_gap(before, old),
        "engine_vs_new": _max_gap(after, new),
        "engine_moved": _max_gap(after, before),
    }
    assert figures["engine_vs_old_before"] < tolerance
    assert figures["engine_vs_new"] < tolerance, figures
    assert figures["engine_moved"] > 100 * tolerance, figures
    # its samples too (their prompts' KV blocks were cached under the old weights: reset on sync)
    how = SamplerSettings(max_new_tokens=6)
    groups = sampler.sample(policy, tok, prompts, 4, how, seed=1)
    drawn = [c for g in groups for c in g]
    engine = [np.array(lp) for g in sampler.last_token_logprobs for lp in g]
    scored = _scored_tokens(policy, [p for p in prompts for _ in range(4)], drawn, tok.pad_token_id)
    figures["samples_vs_new"] = _max_gap(engine, scored)
    assert figures["samples_vs_new"] < tolerance, figures
    with pytest.raises(RuntimeError, match="changed since vLLM last loaded them"):
        with torch.no_grad():
            next(p for p in policy.parameters() if p.requires_grad).add_(1e-3)
        # changed again without a sync: refused
        sampler.sample(policy, tok, prompts, 1, how, seed=1)
    sampler.sync(ref)
    print(figures)
    return figures


def test_sync_full_model(sampler, ref, tok, smollm2_dir, tolerance):
    from disa.models import load_model

    policy = load_model(smollm2_dir, "float32").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a perturbation of every weight matrix, as an update would leave
        for p in policy.parameters():
            if p.ndim == 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.02 * p.std())
    _check_sync(sampler, ref, policy, tok, tolerance)


def test_sync_lora_policy(sampler, ref, tok, smollm2_dir, tolerance):
    from peft import LoraConfig, get_peft_model

    from disa.models import load_model

    policy = get_peft_model(
        load_model(smollm2_dir, "float32"),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    ).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:  # peft starts B at 0, which would change nothing
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    _check_sync(sampler, ref, policy, tok, tolerance)


# -- (d) an online algorithm through the engine ----------------------------------------------------
def test_online_grpo_two_steps_through_vllm(sampler, ref, tok, smollm2_dir, tolerance, tmp_path):
    import lightning as L

    from disa.losses import get_loss
    from disa.models import load_model
    from disa.sampling import SamplerSettings
    from disa.tasks.sumpairs import SumPairsTask
    from disa.training.online import OnlinePolicyModule, prompt_loader

    class LongerIsBetter(SumPairsTask):
        """The few-shot sum prompts, rewarded by completion length: π_ref is rarely right on
        one prompt × 4 samples, and a group of equal rewards has zero advantage (no update)."""

        def rewards(self, prompts, completions):
            return np.array([float(len(c)) for c in completions])

    task = LongerIsBetter(min_sum=4, max_sum=27, template="fewshot")
    prompts: pd.DataFrame = task.prompts("train")
    policy = load_model(smollm2_dir, "float32").train()
    grpo = get_loss("grpo")
    module = OnlinePolicyModule(
        policy,
        None,
        tok,
        task,
        prompts,
        sampler,
        SamplerSettings(max_new_tokens=8),
        grpo,
        grpo.make_options({}),
        lambda params: torch.optim.AdamW(params, lr=1e-4),
        group_size=4,
        updates_per_rollout=1,
        minibatch_size=4,
        seed=0,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    syncs = sampler.syncs
    # 1 prompt × 4 per rollout
    trainer.fit(module, train_dataloaders=prompt_loader(module, len(prompts), 1, seed=0))
    assert trainer.global_step == 2
    assert sampler.syncs - syncs == 2  # before the first rollout and after the first update
    assert module.tokens_generated > 0 and "train/weight_sync_s" in trainer.callback_metrics
    # it was trained
    assert any(not torch.equal(p, q) for p, q in zip(policy.parameters(), ref.parameters()))
    # the engine holds the weights of the second rollout (after one update), not π_ref's
    prompts_ids, completions = _fixed(tok)
    engine = _engine_tokens(sampler, prompts_ids, completions)
    assert (
        _max_gap(engine, _scored_tokens(ref, prompts_ids, completions, tok.pad_token_id))
        > 10 * tolerance
    )
    sampler.sync(ref)
