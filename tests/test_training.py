"""Training plumbing: gradients reach exactly what they should, every algorithm trains."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import tiny_llama

from disa.losses import get_loss
from disa.sampling import SamplerSettings
from disa.sampling.hf import HFSampler
from disa.scoring import pack
from disa.training.module import PolicyModule
from disa.training.online import LogZHead, OnlinePolicyModule


def _batch(char_tok):
    prompts = [char_tok("ab").input_ids, char_tok("c").input_ids]
    comps = [[4, 5, char_tok.eos_token_id], [6, char_tok.eos_token_id]]
    b = pack(prompts, comps, char_tok.pad_token_id)
    return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "position_ids": b.position_ids,
            "completion_mask": b.completion_mask}


def test_disa_step_grad_reaches_policy_not_anchor(char_tok):
    policy = tiny_llama(len(char_tok))
    disa = get_loss("disa")
    module = PolicyModule(policy.train(), disa, disa.make_options({}, beta=2.0), lambda p: torch.optim.SGD(p, lr=0.1))
    module.log = module.log_dict = lambda *a, **k: None  # no trainer attached
    batch = _batch(char_tok)
    batch["log_z_hat"] = torch.tensor([0.5, 1.0], requires_grad=True)
    batch["logp_ref_seq"] = torch.tensor([-3.0, -2.0], requires_grad=True)
    batch["reward"] = torch.tensor([1.0, 0.0])
    loss = module.training_step(batch, 0)
    loss.backward()
    assert batch["log_z_hat"].grad is None and batch["logp_ref_seq"].grad is None
    grads = [p.grad for p in policy.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_flowrl_grad_reaches_log_z_head_not_reference(char_tok):
    policy, ref = tiny_llama(len(char_tok), seed=0), tiny_llama(len(char_tok), seed=1)
    head = LogZHead(policy.config.hidden_size, num_layers=3, dropout=0.0)
    task = type("T", (), {"rewards": lambda self, rows, texts: [float("a" in t) for t in texts]})()
    prompts = pd.DataFrame({"prompt_id": ["p0", "p1"], "prompt": ["ab", "c"]})
    flowrl = get_loss("flowrl")
    module = OnlinePolicyModule(
        policy, ref, char_tok, task, prompts, HFSampler(64), SamplerSettings(max_new_tokens=3), flowrl,
        flowrl.make_options({"beta_f": 15.0, "clip_eps": 0.2}), lambda p: torch.optim.SGD(p, lr=0.1), group_size=4,
        updates_per_rollout=1, minibatch_size=8, log_z_head=head,
    )
    module.trainer = type("Tr", (), {"max_steps": 10})()  # global_step reads nothing else here
    module._trainer = None
    roll = module.rollout([0, 1])
    assert "logp_ref_seq" in roll and not roll["logp_ref_seq"].requires_grad
    logp, mask, batch = module.loss_inputs(roll, torch.arange(8))
    assert set(batch) == set(flowrl.needs(module.options))  # exactly the fields the loss reads
    loss, _ = module.loss(logp, mask, batch, module.options)
    loss.backward()
    assert all(p.grad is None for p in ref.parameters())
    assert all(p.grad is not None for p in head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())


def test_a_group_with_a_missing_reward_is_dropped_whole(char_tok):
    """A grader timeout (NaN) in one completion of prompt p1: p1's whole group leaves the
    rollout and is counted; p0's group trains with its own statistics. Every group missing:
    no update."""
    from disa.losses import group_normalize

    policy = tiny_llama(len(char_tok))
    missing = {"p1"}
    texts_seen: list[str] = []

    def rewards(rows, texts):
        texts_seen[:] = texts
        out = [float(len(t) % 2) for t in texts]
        first_of = {pid: i for i, pid in reversed(list(enumerate(rows.prompt_id)))}
        for pid in missing & set(first_of):
            out[first_of[pid]] = float("nan")  # one member of the group: a timeout
        return out

    task = type("T", (), {"rewards": lambda self, rows, texts: rewards(rows, texts)})()
    prompts = pd.DataFrame({"prompt_id": ["p0", "p1"], "prompt": ["ab", "c"]})
    grpo = get_loss("grpo")
    module = OnlinePolicyModule(
        policy, None, char_tok, task, prompts, HFSampler(64), SamplerSettings(max_new_tokens=3), grpo,
        grpo.make_options({}), lambda p: torch.optim.SGD(p, lr=0.1), group_size=4, updates_per_rollout=1,
        minibatch_size=8,
    )
    module.trainer = type("Tr", (), {"max_steps": 10})()
    module._trainer = None
    roll = module.rollout([0, 1])
    assert module.groups_dropped == 1 and module.rollouts_done == 1
    assert roll["input_ids"].shape[0] == 4 and roll["group_ids"].tolist() == [0, 0, 0, 0]
    kept = torch.tensor([float(len(t) % 2) for t in texts_seen[:4]])  # p0's group, in order
    assert torch.equal(roll["reward"], kept)
    assert torch.allclose(roll["advantages"], group_normalize(kept, torch.zeros(4, dtype=torch.long), "group"))
    missing.add("p0")
    assert module.rollout([0, 1]) is None and module.groups_dropped == 3 and module.rollouts_done == 2


def test_whole_group_minibatches(char_tok):
    module = OnlinePolicyModule.__new__(OnlinePolicyModule)
    module.group_size, module.minibatch = 4, 8
    idx = module.minibatch_index(16, torch.Generator().manual_seed(0))
    groups = (idx // 4).tolist()
    assert len(idx) == 8 and all(groups.count(g) == 4 for g in set(groups))


@pytest.mark.parametrize("algorithm", ["disa", "flowrl", "grpo", "gspo", "lora_sft"])
def test_every_algorithm_trains_on_the_embedded_task(tmp_path, algorithm):
    from test_pipeline import run_py

    run_py(tmp_path, "run", f"algorithm={algorithm}", "logger=csv")
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["algorithm"] == algorithm and s["train.steps"] == 5
    online = algorithm in ("flowrl", "grpo", "gspo")
    assert (s["train.tokens_generated"] > 0) == online
    assert ("anchor.mean_abs_error" in s) == (not online)  # online runs skip the proposal stages
    assert 0 <= s["policy.mean_at_k"] <= 1
    metrics = pd.read_csv(next((tmp_path / "run" / "csv").rglob("metrics.csv")))
    assert metrics["train/loss"].notna().any()


def test_online_algorithm_trains_the_lora_adapters(tmp_path):
    """``algorithm.lora`` applies to the online algorithms too: the saved (merged) policy
    differs from π_ref by a low-rank update in the adapted layers only."""
    from test_pipeline import run_py

    from disa.models import load_model

    run_py(tmp_path, "run", "algorithm=grpo", "logger=none",
           "+algorithm.lora={r:2,alpha:4,dropout:0.0,target_modules:[q_proj]}")
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["train.steps"] == 5 and s["train.tokens_generated"] > 0
    ref_dir = next((tmp_path / "cache" / "backbone").glob("*/ref"))
    policy_dir = next((tmp_path / "cache" / "train").glob("*/policy"))
    ref, policy = load_model(str(ref_dir)).state_dict(), load_model(str(policy_dir)).state_dict()
    changed = {k for k in ref if not torch.equal(ref[k], policy[k])}
    assert changed and all("q_proj" in k for k in changed), changed
    for k in changed:  # W + (α/r)·BA: an update of rank at most r = 2
        assert torch.linalg.matrix_rank((policy[k] - ref[k]).double(), atol=1e-6) <= 2
