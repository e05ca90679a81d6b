"""Multi-process training of a real LM on CPU: SmolLM2-135M-Instruct, 2 processes (gloo).

Each test trains the harness's offline module (disa.training.module / .sharded, the data
module, the DISA loss) for 3 optimizer steps on a fixed cached-rollout batch
(tests/distributed_worker.py: no sampling) and compares the trained parameters with one
unsharded process on the same global batch of 8:

- DDP (Lightning's DDPStrategy), full fine-tuning and LoRA (the harness's peft path);
- FSDP2 (Lightning's ModelParallelStrategy + ``fully_shard`` per decoder layer), whose
  checkpoint, gathered from the shards on rank 0, reloads with ``from_pretrained``.

Tolerance. In exact arithmetic the runs are equal: DISA's loss is a mean over trajectories,
each rank takes an equal half of the global batch, and DDP / FSDP2 average the two halves'
gradients. In float32 they differ by summation order only (two half-batch means and an
average instead of one mean; a smaller padded batch; gloo's reduction), so the figure to
beat is the same single process accumulating the two halves, which shows that reordering
alone. Measured (SGD lr 0.05, gradient clipping at 1 as the trainer presets, 3 steps):

    run                      max |Δθ|   ‖Δθ‖ / ‖θ_T − θ_0‖   probe log-prob max |Δ|
    1 process, 2 micro-b.    3.9e-7     8.0e-5               6.1e-5
    DDP, full FT             3.3e-7     8.1e-5               5.5e-5
    FSDP2, full FT           6.0e-7     1.6e-4               3.4e-5
    DDP, LoRA                1.3e-8     1.4e-6               1.1e-5
    FSDP2, LoRA              1.3e-8     1.5e-6               2.1e-5

against weights moved by up to 1.3e-2 (full FT) and 1.5e-2 (LoRA). The bounds below are
about ten times the measurements and still three orders of magnitude below the movement,
so a missing or wrong gradient reduction (each rank training on its own half) fails them.
SGD keeps an error of the gradient an error of the same size in the weights; AdamW's
normalisation magnifies it for elements whose gradient is near zero (measured with the
harness's AdamW lr 1e-3: max |Δθ| 7e-5 for DDP, 5e-5 for FSDP2, relative 5e-5, 3e-5).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed_worker import compare, launch

pytestmark = pytest.mark.integration

STEPS = ["--steps", "3", "--batch", "8", "--lr", "0.05"]
FULL = {"max_abs": 5e-6, "rel": 2e-3, "probe_logp_max_abs": 5e-4}
LORA = {"max_abs": 5e-7, "rel": 1e-4, "probe_logp_max_abs": 5e-4}


def _within(d: dict, bounds: dict) -> None:
    assert d["moved_max_abs"] > 1000 * bounds["max_abs"], d  # training moved the weights for real
    for key, bound in bounds.items():
        assert d[key] < bound, (key, d)


def _ranks_took_halves(out) -> None:
    stats = json.loads((out / "stats.json").read_text())
    assert stats["world_size"] == 2 and stats["steps"] == 3 and stats["local_batch"] == [4, 4, 4]


@pytest.fixture(scope="module")
def single(smollm2_dir, tmp_path_factory):
    """The unsharded single-process runs on the global batch: full fine-tuning (with its
    trained policy's logits on the probe) and LoRA."""
    root = tmp_path_factory.mktemp("single")
    common = ["--model", smollm2_dir, *STEPS]
    launch([*common, "--out", str(root / "full"), "--mode", "single"], nproc=1, timeout=300)
    launch(
        [*common, "--out", str(root / "lora"), "--mode", "single", "--lora"], nproc=1, timeout=300
    )
    return root


def test_ddp_full_finetuning_equals_one_process(smollm2_dir, single, tmp_path):
    launch(
        ["--model", smollm2_dir, *STEPS, "--out", str(tmp_path), "--mode", "ddp"],
        nproc=2,
        timeout=300,
    )
    _ranks_took_halves(tmp_path)
    _within(compare(single / "full", tmp_path), FULL)


def test_ddp_lora_equals_one_process(smollm2_dir, single, tmp_path):
    launch(
        ["--model", smollm2_dir, *STEPS, "--out", str(tmp_path), "--mode", "ddp", "--lora"],
        nproc=2,
        timeout=300,
    )
    _ranks_took_halves(tmp_path)
    d = compare(single / "lora", tmp_path)
    # adapters only
    assert json.loads((tmp_path / "stats.json").read_text())["trainable_numel"] < 1e6
    _within(d, LORA)


def test_fsdp2_lora_equals_one_process(smollm2_dir, single, tmp_path):
    """Frozen base weights and trainable adapters in the same FSDP2 units."""
    launch(
        ["--model", smollm2_dir, *STEPS, "--out", str(tmp_path), "--mode", "fsdp2", "--lora"],
        nproc=2,
        timeout=300,
    )
    _ranks_took_halves(tmp_path)
    _within(compare(single / "lora", tmp_path), LORA)


def test_fsdp2_equals_unsharded_and_the_checkpoint_reloads(smollm2_dir, single, tmp_path):
    """FSDP2 full fine-tuning equals the unsharded process; the transformers checkpoint
    gathered from the shards (SmolLM2's tied head included) reloads with from_pretrained,
    holds exactly the gathered weights, scores exactly as the sharded model did, and gives
    the unsharded run's logits up to the float32 difference of the training itself."""
    from disa.models import load_model
    from disa.scoring import Batch, token_logprobs

    launch(
        ["--model", smollm2_dir, *STEPS, "--out", str(tmp_path), "--mode", "fsdp2", "--save"],
        nproc=2,
        timeout=300,
    )
    _ranks_took_halves(tmp_path)
    _within(compare(single / "full", tmp_path), FULL)

    reloaded = load_model(str(tmp_path / "policy")).eval()
    assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight  # still tied
    gathered = torch.load(tmp_path / "params.pt")
    params = dict(reloaded.named_parameters())
    assert params.keys() == gathered.keys()
    for name, p in params.items():
        torch.testing.assert_close(p, gathered[name], rtol=0, atol=0, msg=name)
    probe = torch.load(tmp_path / "probe.pt")
    batch = Batch(
        probe["input_ids"], probe["attention_mask"], probe["position_ids"], probe["completion_mask"]
    )
    with torch.no_grad():
        logp = token_logprobs(reloaded, batch, chunk_size=64)
        logits = reloaded(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).logits
    torch.testing.assert_close(logp, probe["logp"], rtol=0, atol=1e-6)  # measured: 0
    want = torch.load(single / "full" / "probe.pt")["logits"]
    mask = batch.attention_mask.bool()
    # measured 3.1e-4 on logits up to |38|: the weights differ by ≤ 6e-7 (see above)
    assert float((logits - want)[mask].abs().max()) < 5e-3
