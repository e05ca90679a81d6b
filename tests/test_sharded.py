"""The FSDP2 path on CPU (disa.training.sharded, trainer=fsdp2_cpu) on a tiny random Llama:
the decoder layers are found from the model, a gathered state fills a plain copy, two
sharded processes train as one process on the global batch, and the checkpoint they save
reloads with ``from_pretrained`` and scores exactly as the sharded model did. The same
equivalences on SmolLM2 (and DDP with full fine-tuning and LoRA) are in
tests/integration/test_distributed.py."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import REPO, run_cli, tiny_llama
from distributed_worker import compare, launch, main
from omegaconf import OmegaConf

from disa.scoring import Batch, token_logprobs
from disa.training.run import _with_lora
from disa.training.sharded import decoder_layer_classes, strip_prefix, unsharded_copy

LORA = OmegaConf.create(
    {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
)


def test_decoder_layers_are_read_from_the_model():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = tiny_llama(8)
    assert decoder_layer_classes(model) == (LlamaDecoderLayer,)
    # through peft
    assert decoder_layer_classes(_with_lora(tiny_llama(8), LORA)) == (LlamaDecoderLayer,)
    model._no_split_modules = None  # no declaration: the decoder's `layers` list tells
    assert decoder_layer_classes(model) == (LlamaDecoderLayer,)
    with pytest.raises(ValueError, match="cannot find the decoder layers"):
        decoder_layer_classes(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("tied", [False, True])
def test_unsharded_copy_holds_the_state(tied):
    """A meta-built copy takes the state's tensors, re-ties a tied head and takes the
    non-persistent rotary buffers from the original: the same logits."""
    from transformers import LlamaForCausalLM

    model = tiny_llama(12)
    if tied:
        model = LlamaForCausalLM(
            model.config.__class__(**{**model.config.to_dict(), "tie_word_embeddings": True})
        )
    state = {f"lm.{k}": v.clone() for k, v in model.state_dict().items()}
    copy = unsharded_copy(model, strip_prefix(state, "lm."))
    assert (copy.lm_head.weight is copy.model.embed_tokens.weight) == tied
    ids = torch.tensor([[1, 5, 6, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(copy(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)
    del state[next(k for k in state if "layers.1." in k)]
    with pytest.raises(RuntimeError, match="does not fill"):
        unsharded_copy(model, strip_prefix(state, "lm."))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with a digit tokenizer, as a transformers directory."""
    from disa.tokenization import build_char_tokenizer

    path = tmp_path_factory.mktemp("tiny") / "model"
    tok = build_char_tokenizer("0123456789+= \n")
    tiny_llama(len(tok), seed=5).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_fsdp2_two_processes_equal_one_and_the_checkpoint_reloads(tmp_path, tiny_dir):
    """FSDP2 over 2 CPU processes (gloo, Lightning's ModelParallelStrategy) after 3 SGD steps
    equals one unsharded process on the global batch up to float32 reordering (the two
    halves' gradients are averaged instead of one batch's); the checkpoint gathered from the
    shards holds exactly the gathered weights and scores exactly as the sharded model did."""
    from disa.models import load_model

    common = [
        "--model",
        str(tiny_dir),
        "--steps",
        "3",
        "--batch",
        "8",
        "--lr",
        "0.1",
        "--chunk-size",
        "5",
    ]
    main([*common, "--out", str(tmp_path / "single"), "--mode", "single"])
    launch(
        [*common, "--out", str(tmp_path / "fsdp2"), "--mode", "fsdp2", "--save"],
        nproc=2,
        timeout=180,
    )

    stats = json.loads((tmp_path / "fsdp2" / "stats.json").read_text())
    assert stats["world_size"] == 2 and stats["local_batch"] == [4, 4, 4]  # each rank its half
    d = compare(tmp_path / "single", tmp_path / "fsdp2")
    assert d["moved_max_abs"] > 1e-2  # training moved the weights far beyond the tolerance
    # measured: 3e-8, 9e-7, 5e-7 here, as for one process accumulating the same two halves
    assert d["max_abs"] < 1e-6 and d["rel"] < 1e-4 and d["probe_logp_max_abs"] < 1e-5, d

    reloaded = load_model(str(tmp_path / "fsdp2" / "policy")).eval()
    gathered = torch.load(tmp_path / "fsdp2" / "params.pt")
    for name, p in reloaded.named_parameters():
        torch.testing.assert_close(p, gathered[name], rtol=0, atol=0, msg=name)
    probe = torch.load(tmp_path / "fsdp2" / "probe.pt")
    batch = Batch(
        probe["input_ids"], probe["attention_mask"], probe["position_ids"], probe["completion_mask"]
    )
    with torch.no_grad():
        logp = token_logprobs(reloaded, batch, chunk_size=5)
    torch.testing.assert_close(logp, probe["logp"], rtol=0, atol=1e-6)


# -- trainer=fsdp2_cpu -------------------------------------------------------------------------
def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_fsdp2_cpu_trainer_preset():
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import ModelParallelStrategy

    from disa.config import validate

    cfg = _compose("trainer=fsdp2_cpu")
    validate(cfg)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert isinstance(trainer.strategy, ModelParallelStrategy) and trainer.world_size == 2
    assert trainer.strategy.root_device.type == "cpu"
    validate(_compose("trainer=fsdp2_cpu", "algorithm=lora_sft"))


def test_fsdp2_gpu_preset_composes_and_validates():
    # trainer=fsdp2 needs GPUs to run (experiments/gpu_check.py runs it); here: what it asks for
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import ModelParallelStrategy

    from disa.config import validate

    cfg = _compose("trainer=fsdp2")
    validate(cfg)
    t = cfg.trainer
    assert (t.accelerator, t.devices, t.precision, t.use_distributed_sampler) == (
        "gpu",
        "auto",
        "bf16-mixed",
        False,
    )
    strategy = instantiate(t.strategy)
    assert isinstance(strategy, ModelParallelStrategy)
    assert (t.strategy.data_parallel_size, t.strategy.tensor_parallel_size) == ("auto", 1)
    assert t.strategy.save_distributed_checkpoint is False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["algorithm=grpo"],
            "algorithm=grpo (online) with trainer.strategy=ModelParallelStrategy is not supported",
        ),
        (["trainer.strategy.tensor_parallel_size=2"], "tensor_parallel_size=2 is not supported"),
        (
            ["trainer.strategy.save_distributed_checkpoint=true"],
            "save_distributed_checkpoint=True is not supported",
        ),
    ],
)
def test_fsdp2_cpu_refused_settings(overrides, message):
    from disa.config import ConfigError, validate

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(_compose("trainer=fsdp2_cpu", *overrides))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["disa", "lora_sft"])
def test_fsdp2_cpu_run_one_run_dir_one_summary(tmp_path, algorithm):
    """``python run.py trainer=fsdp2_cpu``: the whole pipeline with the train stage sharded over
    2 CPU processes; rank 0 gathers the policy (LoRA merged), evaluates and writes the summary."""
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1",
        "HYDRA_FULL_ERROR": "1",
    }
    proc = run_cli(
        "debug=fast",
        "trainer=fsdp2_cpu",
        f"algorithm={algorithm}",
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        env=env,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "MEMBER: 2/2" in log
    run = tmp_path / "run"
    assert (
        len(list(tmp_path.rglob("summary.json"))) == 1
        and (run / "train_ddp_process_1.log").exists()
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train.steps"] == 5 and "policy.mean_at_k" in summary
    # one file: save_distributed_checkpoint=false
    assert (run / "checkpoints" / "last.ckpt").is_file()
    # the trained weights were gathered
    assert summary["policy.tv_target"] != summary["ref.tv_target"]


@pytest.mark.slow
def test_fsdp2_resume_is_exact(tmp_path, tiny_dir):
    """A sharded run stopped after 2 of 4 AdamW steps and resumed from its Lightning
    checkpoint (one file: weights and sharded optimizer state gathered on rank 0, loaded
    back into the shards) ends bit for bit where the uninterrupted run does."""
    common = [
        "--model",
        str(tiny_dir),
        "--batch",
        "8",
        "--optimizer",
        "adamw",
        "--lr",
        "0.01",
        "--chunk-size",
        "5",
        "--mode",
        "fsdp2",
    ]
    ckpt = str(tmp_path / "checkpoints")
    launch([*common, "--steps", "4", "--out", str(tmp_path / "whole")], nproc=2, timeout=180)
    launch(
        [*common, "--steps", "2", "--out", str(tmp_path / "first"), "--checkpoints", ckpt],
        nproc=2,
        timeout=180,
    )
    log = launch(
        [*common, "--steps", "4", "--out", str(tmp_path / "resumed"), "--checkpoints", ckpt],
        nproc=2,
        timeout=180,
    )
    assert "Restored all states from the checkpoint" in log
    d = compare(tmp_path / "whole", tmp_path / "resumed")
    assert d["moved_max_abs"] > 1e-2 and d["max_abs"] == 0 and d["probe_logp_max_abs"] == 0, d
    whole = json.loads((tmp_path / "whole" / "stats.json").read_text())["losses"]
    assert json.loads((tmp_path / "resumed" / "stats.json").read_text())["losses"] == whole[2:]
