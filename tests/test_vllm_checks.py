"""The parts of the vLLM sampler that need no vLLM: the log-prob agreement check the score
stage applies (``sampler.logprob_tolerance``), the weights handed to an engine (LoRA merged
without touching the policy), the online module's once-per-step sync, and the config rules
of sampler=vllm. The engine itself is exercised in tests/integration/test_vllm_cpu.py."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_llama

from disa.config import ConfigError, validate
from disa.sampling.vllm import LogprobMismatch, check_agreement, logprob_agreement, policy_weights
from disa.stages.score import check_sampler_agreement


# -- the agreement check -------------------------------------------------------------------------
def test_agreement_per_token_and_impossible_samples():
    a = logprob_agreement(
        [-3.0, -2.0, -1.0, -0.5, float("nan")],
        [-3.0004, -2.0, -1.0, float("-inf"), -1.0],
        [4, 1, 1, 2, 3],
    )
    # the nan one is not reported by the engine
    assert a["compared"] == 3 and a["scorer_impossible"] == 1
    assert a["max_abs_diff"] == pytest.approx(4e-4) and a[
        "max_abs_diff_per_token"
    ] == pytest.approx(1e-4)
    assert a["mean_abs_diff_per_token"] == pytest.approx(1e-4 / 3)


def test_within_tolerance_passes_and_none_only_reports():
    agreement = {
        "ref": {
            "compared": 256.0,
            "max_abs_diff": 2e-4,
            "mean_abs_diff_per_token": 2e-5,
            "max_abs_diff_per_token": 6e-5,
            "scorer_impossible": 0.0,
        }
    }
    check_agreement(agreement, 1e-3)
    check_agreement({"ref": {**agreement["ref"], "max_abs_diff_per_token": 5.0}}, None)
    check_sampler_agreement(agreement, "1e-3")  # a string from the command line is read as a number
    check_sampler_agreement({}, 1e-3)  # an engine that reports nothing (HF) has nothing to check


def test_beyond_tolerance_is_refused_with_the_setting_the_gap_and_the_tolerance():
    agreement = {
        "ref": {
            "compared": 256.0,
            "max_abs_diff": 1e-4,
            "mean_abs_diff_per_token": 1e-5,
            "max_abs_diff_per_token": 3e-5,
            "scorer_impossible": 0.0,
        },
        "proposal": {
            "compared": 128.0,
            "max_abs_diff": 0.25,
            "mean_abs_diff_per_token": 0.04,
            "max_abs_diff_per_token": 0.0625,
            "scorer_impossible": 0.0,
        },
    }
    with pytest.raises(LogprobMismatch) as e:
        check_sampler_agreement(agreement, 1e-3)
    msg = str(e.value)
    assert (
        "sampler.logprob_tolerance=0.001" in msg
        and "component 'proposal'" in msg
        and "0.0625" in msg
    )
    assert "component 'ref'" not in msg  # the component within tolerance is not named
    assert "128 samples" in msg


def test_sample_the_scorer_rules_out_is_refused():
    agreement = {
        "ref": {
            "compared": 10.0,
            "max_abs_diff": 0.0,
            "mean_abs_diff_per_token": 0.0,
            "max_abs_diff_per_token": 0.0,
            "scorer_impossible": 2.0,
        }
    }
    with pytest.raises(LogprobMismatch, match="2 samples drawn by the engine have probability 0"):
        check_agreement(agreement, 1.0)


def test_a_manifest_from_before_the_per_token_field_is_not_refused():
    check_agreement(
        {"ref": {"compared": 4.0, "max_abs_diff": 0.1, "mean_abs_diff_per_token": 0.01}}, 1e-3
    )


def test_nothing_compared_is_nan_not_an_error():
    a = logprob_agreement([float("nan")], [-1.0], [1])
    assert a["compared"] == 0 and math.isnan(a["max_abs_diff_per_token"])
    check_agreement({"ref": a}, 1e-3)


# -- the weights an engine is given ----------------------------------------------------------------
def test_policy_weights_of_a_plain_model_are_its_state_dict(char_tok):
    model = tiny_llama(len(char_tok))
    got = dict(policy_weights(model))
    assert got.keys() == model.state_dict().keys()
    # no copies
    assert all(got[k].data_ptr() == v.data_ptr() for k, v in model.state_dict().items())


def test_policy_weights_of_a_lora_model_are_merged_under_base_names(char_tok):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(len(char_tok))
    original = {k: v.clone() for k, v in base.state_dict().items()}
    names = set(original)
    policy = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # peft starts B at 0: make the adapters change the weights
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    got = {k: v.clone() for k, v in policy_weights(policy)}
    assert set(got) == names
    for n, p in policy.named_parameters():  # the policy is left as it was, exactly
        assert torch.equal(p, before[n]), n
    merged = policy.merge_and_unload().state_dict()
    changed = 0
    for k in names:
        torch.testing.assert_close(got[k], merged[k], rtol=0, atol=1e-6, msg=k)
        changed += not torch.equal(got[k], original[k])
    assert changed == 4  # q_proj and v_proj of both layers


# -- the online module gives the sampler the policy once per optimizer step --------------------------
def test_online_sync_once_per_step():
    from disa.training.online import OnlinePolicyModule

    calls = []
    sampler = SimpleNamespace(sync=lambda model: calls.append(model) or 0.5)
    module = SimpleNamespace(
        sampler=sampler, policy="policy", global_step=0, _synced_step=None, weight_sync_seconds=0.0
    )
    for step in (0, 0, 1, 1, 1, 3):
        module.global_step = step
        OnlinePolicyModule.sync_sampler(module)
    assert len(calls) == 3 and module.weight_sync_seconds == 1.5 and module._synced_step == 3
    hf = SimpleNamespace(
        sampler=object(), policy="policy", global_step=0, _synced_step=None, weight_sync_seconds=0.0
    )
    OnlinePolicyModule.sync_sampler(hf)  # HF generate samples the policy itself: nothing to sync
    assert hf._synced_step is None


# -- config ------------------------------------------------------------------------------------------
def _errors(cfg) -> str:
    try:
        validate(cfg)
    except ConfigError as e:
        return str(e)
    return ""


def test_online_vllm_is_allowed_single_process_only(make_cfg):
    single = _errors(make_cfg("sampler=vllm", "algorithm=grpo"))
    assert "(online)" not in single  # only vLLM's absence, where it is not installed
    multi = _errors(make_cfg("sampler=vllm", "algorithm=flowrl", "trainer=ddp_sim"))
    assert (
        "algorithm=flowrl (online) and trainer.strategy='ddp'" in multi
        and "single-process trainer" in multi
    )
    assert "sampler.in_process=false with algorithm=gspo (online) is not supported" in _errors(
        make_cfg("sampler=vllm", "algorithm=gspo", "sampler.in_process=false")
    )


@pytest.mark.parametrize(
    ("override", "setting"),
    [
        ("sampler.logprob_tolerance=0", "sampler.logprob_tolerance=0"),
        ("sampler.cpu_kv_cache_gib=-1", "sampler.cpu_kv_cache_gib=-1"),
        ("sampler.enforce_eager=3", "sampler.enforce_eager=3"),
    ],
)
def test_vllm_cpu_settings_are_checked(make_cfg, override, setting):
    assert f"{setting} is invalid" in _errors(make_cfg("sampler=vllm", override))


def test_vllm_config_carries_a_tolerance(make_cfg):
    cfg = make_cfg("sampler=vllm")
    assert 0 < cfg.sampler.logprob_tolerance < 0.01 and cfg.sampler.cpu_kv_cache_gib > 0
    # sampler=hf reports no log-probs of its own
    assert make_cfg().sampler.logprob_tolerance is None
