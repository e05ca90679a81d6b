"""Scale and speed (issue 7): trainer presets, the vLLM sampler's absence and plumbing,
gradient checkpointing, the chunked log-prob function's memory and gradients, the benchmark
script, and DDP on two CPU processes (slow)."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pandas as pd
import pytest
import torch
from conftest import run_cli, tiny_llama
from hydra.utils import instantiate

from disa.config import ConfigError, validate
from disa.scoring import _ChunkedLogProbs, pack, process_logits, token_logprobs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import benchmark  # noqa: E402

HAS_VLLM = importlib.util.find_spec("vllm") is not None
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
VLLM_HINT = "sampler=vllm needs the 'vllm' extra: pip install 'disa[vllm]' on a CUDA machine"


def _env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


# -- trainer presets -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("preset", "strategy"),
    [
        ("ddp", "ddp"),
        ("ddp_sim", "ddp"),
        ("fsdp", "FSDPStrategy"),
        ("deepspeed", "DeepSpeedStrategy"),
    ],
)
def test_trainer_presets_compose(make_cfg, preset, strategy):
    cfg = make_cfg(f"trainer={preset}")
    s = cfg.trainer.strategy
    assert strategy in (s if isinstance(s, str) else s._target_)
    assert cfg.trainer.use_distributed_sampler is False  # the data module's batch stream is kept
    if preset == "deepspeed" and not HAS_DEEPSPEED:
        with pytest.raises(
            ConfigError,
            match=r"trainer=deepspeed needs the 'deepspeed' extra: pip install 'disa\[deepspeed\]'",
        ):
            validate(cfg)
        return
    validate(cfg)
    if preset != "ddp_sim":
        assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"


def test_ddp_sim_trainer_has_world_size_two(make_cfg):
    from lightning.pytorch.strategies import DDPStrategy

    trainer = instantiate(
        make_cfg("trainer=ddp_sim").trainer, logger=False, enable_checkpointing=False
    )
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.world_size == 2
    assert trainer.strategy.root_device.type == "cpu"


def test_fsdp_wraps_decoder_layers(make_cfg):
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    strategy = instantiate(make_cfg("trainer=fsdp").trainer.strategy)
    policy = (
        strategy._fsdp_kwargs.get("auto_wrap_policy")
        if hasattr(strategy, "_fsdp_kwargs")
        else strategy.kwargs["auto_wrap_policy"]
    )
    assert isinstance(policy, ModuleWrapPolicy) and Qwen2DecoderLayer in policy._module_classes


def test_multi_process_strategy_refused_in_local_sweep(tmp_path):
    proc = run_cli(
        "-m",
        "debug=fast",
        "trainer=ddp_sim",
        "seed=0,1",
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode != 0
    assert (
        "in a local -m sweep" in proc.stderr
        and "Lightning re-runs the whole command line" in proc.stderr
    )
    assert not (tmp_path / "cache").exists()  # refused before any work


# -- vLLM ----------------------------------------------------------------------------------------
@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed")
def test_vllm_absent_is_a_clear_config_error(make_cfg):
    with pytest.raises(ConfigError) as e:
        validate(make_cfg("sampler=vllm"))
    lines = [ln for ln in str(e.value).splitlines() if ln.strip().startswith("- ")]
    # the vllm settings themselves are valid
    assert len(lines) == 1 and VLLM_HINT in lines[0], str(e.value)


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed")
def test_vllm_absent_at_build_time(make_cfg):
    from disa.sampling import build_sampler
    from disa.sampling.vllm import VLLMMissing

    with pytest.raises(VLLMMissing, match=r"sampler=vllm needs the 'vllm' extra"):
        build_sampler(make_cfg("sampler=vllm"))


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed")
def test_vllm_absent_from_the_command_line(tmp_path):
    proc = run_cli(
        "sampler=vllm",
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode != 0 and VLLM_HINT in proc.stderr
    assert not (tmp_path / "cache").exists()


def test_vllm_settings_and_multi_process_online_refused(make_cfg):
    msg = ""
    try:
        validate(
            make_cfg(
                "sampler=vllm",
                "algorithm=grpo",
                "trainer=ddp_sim",
                "sampler.gpu_memory_utilization=1.5",
                "sampler.tensor_parallel_size=0",
            )
        )
    except ConfigError as e:
        msg = str(e)
    # online algorithms sample through vLLM in one training process (the weights are synced into it)
    assert "algorithm=grpo (online) and trainer.strategy='ddp'" in msg
    assert (
        "sampler.gpu_memory_utilization=1.5 is invalid" in msg
        and "sampler.tensor_parallel_size=0 is invalid" in msg
    )


def test_vllm_completion_normalisation_and_agreement():
    from disa.sampling.vllm import _completion, logprob_agreement

    def out(ids, reason, lps):
        return SimpleNamespace(
            token_ids=ids,
            finish_reason=reason,
            logprobs=None
            if lps is None
            else [{t: SimpleNamespace(logprob=v)} for t, v in zip(ids, lps)],
        )

    assert _completion(out([5, 6, 2, 7], "stop", [-1.0, -2.0, -0.5, -9.0]), eos=2) == (
        [5, 6, 2],
        -3.5,
    )
    # stopped on EOS, token left out
    ids, lp = _completion(out([5, 6], "stop", [-1.0, -2.0]), eos=2)
    assert ids == [5, 6, 2] and lp != lp  # nan: no log-prob for the appended EOS
    assert _completion(out([5, 6], "length", None), eos=2)[0] == [5, 6]
    agree = logprob_agreement([-3.0, float("nan"), -1.0], [-3.1, -2.0, -1.0], [2, 1, 1])
    assert agree["compared"] == 2 and abs(agree["max_abs_diff"] - 0.1) < 1e-9
    assert abs(agree["mean_abs_diff_per_token"] - 0.025) < 1e-9


def test_vllm_model_path(tmp_path, char_tok):
    from transformers import AutoModelForCausalLM

    from disa.sampling.vllm import _weights_signature, model_path

    model = tiny_llama(len(char_tok))
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model_path(loaded) == str(tmp_path / "m")
    before = _weights_signature(loaded)
    with torch.no_grad():
        next(loaded.parameters()).add_(1.0)
    assert _weights_signature(loaded) != before  # a changed policy is noticed


# -- gradient checkpointing ---------------------------------------------------------------------
def test_gradient_checkpointing_setting(make_cfg):
    cfg = make_cfg()
    assert cfg.checkpoint.activations is False
    validate(make_cfg("checkpoint.activations=true"))
    with pytest.raises(ConfigError, match="checkpoint.activations"):
        validate(make_cfg("checkpoint.activations=3"))


def test_gradient_checkpointing_on_the_embedded_model(char_tok):
    """Same loss and gradients; the decoder layers really run twice (recomputed in backward)."""
    from omegaconf import OmegaConf
    from transformers import LlamaForCausalLM

    from disa.models import embedded_config

    b = OmegaConf.load(REPO / "conf" / "backbone" / "embedded.yaml")
    torch.manual_seed(0)
    model = LlamaForCausalLM(embedded_config(len(char_tok), b)).train()
    batch = pack([[1, 4, 5], [1, 6]], [[6, 7, 2], [8, 2]], pad_id=0)
    calls = []
    model.model.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))

    def run():
        model.zero_grad(set_to_none=True)
        calls.clear()
        loss = token_logprobs(model, batch).sum()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    loss0, g0, n0 = run()
    # as disa.training.run.fit does for checkpoint.activations=true
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)(
        {"use_reentrant": False}
    )
    loss1, g1, n1 = run()
    assert (n0, n1) == (1, 2)
    torch.testing.assert_close(loss0, loss1)
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], atol=1e-6, rtol=1e-5, msg=n)


# -- the chunked projection -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("temperature", "top_k", "chunk"), [(1.0, 0, 4), (0.7, 0, 3), (1.3, 5, 2), (1.0, 0, 100)]
)
def test_chunked_logprobs_gradients_match_autograd(temperature, top_k, chunk):
    g = torch.Generator().manual_seed(0)
    N, H, V = 11, 8, 17
    h = torch.randn(N, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True)
    logits = torch.nn.functional.linear(h.detach(), w.detach(), b.detach())
    targets = logits.argmax(-1)  # kept by top-k
    targets[::2] = torch.randint(0, V, (len(targets[::2]),), generator=g)
    coef = torch.randn(N, generator=g)

    ref = process_logits(torch.nn.functional.linear(h, w, b), temperature, top_k)
    ref = ref.gather(-1, targets[:, None]).squeeze(-1) - ref.logsumexp(-1)
    keep = torch.isfinite(ref)
    (ref[keep] * coef[keep]).sum().backward()
    want = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    out = _ChunkedLogProbs.apply(h, w, b, targets, chunk, temperature, top_k, 1.0)
    torch.testing.assert_close(out[keep], ref[keep].detach())
    assert torch.equal(torch.isfinite(out), keep)
    (out[keep] * coef[keep]).sum().backward()
    for got, exp in zip((h.grad, w.grad, b.grad), want):
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)


def test_chunked_logprobs_under_bf16_autocast(tiny_model):
    batch = pack([[1, 4, 5], [1, 6, 7, 8]], [[6, 7, 2], [8, 9, 9, 2]], pad_id=0)
    model = tiny_model.train()

    def grads(fn):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp = fn()
        lp.sum().backward()
        return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    lp, g = grads(lambda: token_logprobs(model, batch, chunk_size=2))
    ref, g_ref = grads(lambda: benchmark._naive_logprobs(model, batch))
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, ref, atol=0.05, rtol=0.0)  # bf16 projection either way
    for n in g:
        assert g[n].dtype == torch.float32
        torch.testing.assert_close(g[n], g_ref[n], atol=0.05, rtol=0.05, msg=n)
    model.eval()


def test_peak_memory_measures_a_known_allocation():
    def fn():
        a = torch.empty(1 << 20, dtype=torch.float32)  # 4 MiB
        b = torch.empty(1 << 19, dtype=torch.float32)  # 2 MiB, while a lives
        del a, b

    assert abs(benchmark.peak_memory(fn, torch.device("cpu")) - 6 * 2**20) < 2**16


def test_chunked_peak_memory_below_naive():
    args = benchmark.parse_args(["--quick", "--mem-vocab", "2048"])
    rows = benchmark.memory_comparison(args, torch.device("cpu"), benchmark.contextlib.nullcontext)
    for grad in (False, True):
        naive = next(r for r in rows if r["grad"] == grad and r["method"] == "naive")[
            "peak_mem_mib"
        ]
        chunked = sorted(
            (r for r in rows if r["grad"] == grad and r["method"] == "chunked"),
            key=lambda r: r["chunk_size"],
        )
        assert all(r["peak_mem_mib"] <= naive for r in chunked)
        assert chunked[0]["peak_mem_mib"] < chunked[1]["peak_mem_mib"]  # smaller chunks, lower peak
        assert chunked[0]["peak_mem_mib"] < 0.5 * naive


# -- benchmark ------------------------------------------------------------------------------------
def test_benchmark_quick_writes_json(tmp_path):
    out = tmp_path / "b.json"
    benchmark.main(["--quick", "--out", str(out)])
    res = json.loads(out.read_text())
    assert {"meta", "steps", "scoring", "memory", "online", "generation", "targets"} <= set(res)
    assert {r["method"] for r in res["steps"]} == {"disa", "sft_chunked", "sft_hf", "naive"}
    assert {r["method"] for r in res["scoring"]} == {"chunked", "naive"}
    for r in res["steps"] + res["scoring"]:
        assert r["seconds"] > 0 and r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["peak_mem_mib"] > 0
    assert {r["algorithm"] for r in res["online"]} == {"flowrl", "grpo"}
    flowrl = next(r for r in res["online"] if r["algorithm"] == "flowrl")
    assert flowrl["reference_pass"] and flowrl["ratio_to_disa"] > 0 and flowrl["generate_s"] > 0
    assert set(res["targets"]) == set(benchmark.TARGETS)
    assert res["meta"]["peak_flops"] > 0 and res["meta"]["device"] == "cpu"


# -- DDP on two CPU processes ---------------------------------------------------------------
@pytest.mark.slow
def test_ddp_sim_one_run_dir_one_summary(tmp_path):
    """``trainer=ddp_sim``: Lightning re-runs run.py for rank 1 in rank 0's run directory; rank 1
    trains and stops, rank 0 alone evaluates and writes summary.json."""
    env = {**_env(), "HYDRA_FULL_ERROR": "1"}
    proc = run_cli(
        "debug=fast",
        "trainer=ddp_sim",
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        env=env,
        timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "MEMBER: 2/2" in log and "Starting with 2 processes" in log  # world size 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run"]  # no other output dir
    run = tmp_path / "run"
    assert len(list(tmp_path.rglob("summary.json"))) == 1
    assert (run / "train_ddp_process_1.log").exists()  # rank 1 ran in the same directory
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train.steps"] == 5 and "policy.mean_at_k" in summary
    assert (run / "policy" / "config.json").exists()


@pytest.mark.slow
def test_local_sweep_with_ddp_spawn(tmp_path):
    """A local ``-m`` sweep with a 2-process trainer (``trainer.strategy=ddp_spawn``): one run
    directory and summary per job, offline and online algorithms, with the step and token
    counts of the spawned training processes (not the main process's idle trainer)."""
    proc = run_cli(
        "-m",
        "debug=fast",
        "trainer=ddp_sim",
        "trainer.strategy=ddp_spawn",
        "algorithm=disa,grpo",
        "logger=csv",
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
        env={**_env(), "HYDRA_FULL_ERROR": "1"},
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    summaries = [
        json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/summary.json"))
    ]
    assert [s["algorithm"] for s in summaries] == ["disa", "grpo"]
    assert all(s["train.steps"] == 5 for s in summaries)
    assert summaries[0]["train.tokens_generated"] == 0 < summaries[1]["train.tokens_generated"]
    for s in summaries:  # the trained weights came back: the policy is not π_ref
        assert s["policy.tv_target"] != s["ref.tv_target"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_benchmark_quick_on_cuda(tmp_path):
    out = tmp_path / "b.json"
    benchmark.main(["--quick", "--device", "cuda", "--preset", "qwen0.5b", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["meta"]["train_precision"] == "bf16-mixed" and res["meta"]["peak_flops"] > 0
    assert all(not r.get("oom") for r in res["steps"] + res["scoring"])


class _StepRecorder(L.Callback):
    """Saves, per rank, the gradients as the optimizer is about to step and the step's loss."""

    def __init__(self, out: Path):
        self.out = out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = {
            n: p.grad.detach().clone()
            for n, p in pl_module.named_parameters()
            if p.grad is not None
        }
        torch.save(grads, self.out / f"grads-{trainer.global_rank}.pt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.save(
            {"loss": outputs["loss"].detach(), "n": len(batch["reward"])},
            self.out / f"loss-{trainer.global_rank}.pt",
        )


def _one_disa_step(out, char_tok, frame, devices: int, batch_size: int) -> None:
    from disa.losses import get_loss
    from disa.training.data import TrajectoryDataModule
    from disa.training.module import PolicyModule

    policy = tiny_llama(len(char_tok), seed=3).train()
    disa = get_loss("disa")
    module = PolicyModule(
        policy,
        disa,
        disa.make_options({}, beta=2.0),
        functools.partial(torch.optim.SGD, lr=0.1),
        chunk_size=5,
    )
    data = TrajectoryDataModule(frame, batch_size, char_tok.pad_token_id, seed=11)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_steps=1,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[_StepRecorder(out)],
    )
    trainer.fit(module, datamodule=data)


def test_ddp_two_processes_equal_one_process_on_the_global_batch(tmp_path, char_tok):
    """``trainer=ddp_sim``'s mechanics (DDP, 2 CPU processes, gloo): each rank takes its half of
    the global batch from the step-addressed stream, and the all-reduced gradient equals the
    single-process gradient on the whole global batch (DISA's loss is a mean over trajectories
    and the halves are equal, so the mean of the ranks' means is the global mean)."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = 24
    frame = pd.DataFrame(
        {
            "prompt_ids": [
                [char_tok.bos_token_id, *rng.integers(4, 10, size=rng.integers(1, 4)).tolist()]
                for _ in range(n)
            ],
            "completion_ids": [
                [*rng.integers(4, 10, size=rng.integers(1, 6)).tolist(), char_tok.eos_token_id]
                for _ in range(n)
            ],
            "reward": rng.integers(0, 2, size=n).astype(float),
            "logp_ref": rng.normal(-8, 2, size=n),
            "log_z_hat": rng.normal(0, 1, size=n),
        }
    )
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir(), ddp.mkdir()
    _one_disa_step(single, char_tok, frame, devices=1, batch_size=8)
    _one_disa_step(ddp, char_tok, frame, devices=2, batch_size=4)

    ranks = [torch.load(ddp / f"loss-{r}.pt") for r in (0, 1)]
    assert [r["n"] for r in ranks] == [4, 4]  # each rank trained on its half
    whole = torch.load(single / "loss-0.pt")
    assert whole["n"] == 8
    torch.testing.assert_close(
        (ranks[0]["loss"] + ranks[1]["loss"]) / 2, whole["loss"], rtol=1e-5, atol=1e-6
    )
    g1, g2 = torch.load(single / "grads-0.pt"), torch.load(ddp / "grads-0.pt")
    assert g1.keys() == g2.keys() and len(g1) > 0
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6, msg=name)
    # rank 1 holds the same all-reduced gradient
    for name, g in torch.load(ddp / "grads-1.pt").items():
        torch.testing.assert_close(g, g2[name], rtol=0, atol=0)


@pytest.mark.parametrize("lora", [False, True])
def test_unsharded_policy_holds_the_gathered_weights(tmp_path, char_tok, lora):
    """The path FSDP/ZeRO-3 take at the end of training: a full module state dict (policy
    under ``policy.``, plus FlowRL's head) is loaded into a fresh copy of the backbone."""
    from omegaconf import OmegaConf

    from disa.training.online import LogZHead
    from disa.training.run import _with_lora, unsharded_policy

    tiny_llama(len(char_tok), seed=1).save_pretrained(tmp_path / "ref")
    alg = OmegaConf.create(
        {"lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}
        if lora
        else {}
    )
    trained = tiny_llama(len(char_tok), seed=1)
    if lora:
        trained = _with_lora(trained, alg.lora)
    with torch.no_grad():  # "training": every weight moves, the adapters' zero-initialised B too
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    holder = torch.nn.Module()
    holder.policy, holder.log_z_head = trained, LogZHead(32)
    state = holder.state_dict()
    a_layer_1_key = next(k for k in state if "layers.1" in k)

    rebuilt = unsharded_policy(str(tmp_path / "ref"), alg, state)
    if lora:
        rebuilt, trained = rebuilt.merge_and_unload(), trained.merge_and_unload()
    expected = trained.state_dict()
    got = rebuilt.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, msg=k)

    del state[a_layer_1_key]
    with pytest.raises(RuntimeError, match="does not match the backbone"):
        unsharded_policy(str(tmp_path / "ref"), alg, state)


def test_fsdp_state_dict_type_must_be_full(make_cfg):
    cfg = make_cfg("trainer=fsdp", "trainer.strategy.state_dict_type=sharded")
    with pytest.raises(ConfigError, match="state_dict_type='sharded'.*allowed: 'full'"):
        validate(cfg)


def test_sampler_logprobs_kept_and_checked_against_the_scorer(tmp_path, monkeypatch, make_cfg):
    """An engine that reports its own log-probs (as vLLM does) has them stored beside the
    rollouts and compared per component with the scored ``logq``: the summary shows ~0 for an
    engine that samples the scored model and the offset for one that does not. The engine
    here is a test double: HF ``generate`` plus log-probs computed by the scorer, shifted by
    0.25 nats per sequence for the proposal (a stand-in for a mismatched checkpoint)."""

    import disa.stages.sample as sample_stage
    from disa.sampling.hf import HFSampler
    from disa.scoring import sequence_logprobs

    class ReportingSampler(HFSampler):
        def sample(self, model, tok, prompt_ids, n, settings, seed):
            groups = super().sample(model, tok, prompt_ids, n, settings, seed)
            lp = sequence_logprobs(
                model,
                [p for p in prompt_ids for _ in range(n)],
                [c for g in groups for c in g],
                tok.pad_token_id,
                temperature=settings.temperature,
                top_k=settings.top_k,
                top_p=settings.top_p,
            ).tolist()
            shift = 0.25 if "proposal" in str(model.name_or_path) else 0.0
            self.last_logprobs = [
                [x + shift for x in lp[i * n : (i + 1) * n]] for i in range(len(prompt_ids))
            ]
            return groups

    monkeypatch.setattr(
        sample_stage, "build_sampler", lambda cfg: ReportingSampler(int(cfg.sampler.batch_size))
    )
    from disa.job import run

    def stage(name: str) -> dict:
        return run(
            make_cfg("debug=fast", f"cache_dir={tmp_path / 'cache'}", f"stage={name}"),
            tmp_path / name,
        )

    stage("sample")
    summary = stage("score")
    assert summary["score.sampler_compared.ref"] == summary["score.sampler_compared.proposal"] > 0
    assert summary["score.sampler_max_abs_diff.ref"] < 1e-4
    assert summary["score.sampler_max_abs_diff.proposal"] == pytest.approx(0.25, abs=1e-4)
    scores = pd.read_parquet(next((tmp_path / "cache" / "score").rglob("scores.parquet")))
    assert scores.sampler_logprob.notna().all()
    # with a tolerance the same (reused) scores are refused, naming the component that is off
    from disa.sampling.vllm import LogprobMismatch

    with pytest.raises(
        LogprobMismatch, match=r"beyond sampler.logprob_tolerance=0.001 nats per token"
    ) as e:
        run(
            make_cfg(
                "debug=fast",
                f"cache_dir={tmp_path / 'cache'}",
                "stage=score",
                "sampler.logprob_tolerance=0.001",
            ),
            tmp_path / "refused",
        )
    assert "component 'proposal'" in str(e.value) and "component 'ref'" not in str(e.value)
