"""One short training run of the harness's offline module, for the multi-process equivalence
tests (tests/test_sharded.py, tests/integration/test_distributed.py).

The same script runs as a single process on the global batch (``--mode single``) or as one
rank of a ``torchrun`` launch (``--mode ddp``: Lightning's DDPStrategy; ``--mode fsdp2``:
Lightning's ModelParallelStrategy with :class:`disa.training.sharded.ShardedPolicyModule`),
so that the runs differ in their distribution only: the model, the LoRA adapters, the
cached-rollout frame, the data module, the loss, the optimizer and the trainer settings are
built by the same lines. Nothing is sampled: the trajectories are a fixed few-shot sum
task ("12 = 5 + 7\\n20 = 11 + 9\\n{n} =" → " {a} + {b}\\n<eos>") with synthetic cache columns
(reward = whether a + b = n, log π_ref and log Ẑ from a seeded generator), which is all the
DISA loss reads.

    python tests/distributed_worker.py --model DIR --out OUT --mode single --batch 8
    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        tests/distributed_worker.py --model DIR --out OUT --mode fsdp2 --batch 8

Rank 0 writes into ``--out``: ``params.pt`` (the trainable parameters after training, by
name, unsharded), ``probe.pt`` (the per-token log-probs of a fixed probe batch under the
trained policy, computed the way the run trains: through the FSDP2 root for fsdp2; for
single also the full logits), ``stats.json`` (losses, how far training moved the weights,
seconds) and, with ``--save``, ``policy/``: the trained policy as a transformers checkpoint
(for fsdp2 through the sharded gather of :func:`disa.training.sharded.save_pretrained`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def trajectories(tok, n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` cached trajectories of the few-shot sum task with synthetic cache columns."""
    from disa.tokenization import encode_prompt

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        total = int(rng.integers(4, 19))
        a = int(rng.integers(1, total))
        b = total - a if i % 2 == 0 else int(rng.integers(1, 10))  # half of them right
        prompt = f"12 = 5 + 7\n20 = 11 + 9\n{total} ="
        completion = tok(f" {a} + {b}\n", add_special_tokens=False).input_ids + [tok.eos_token_id]
        rows.append(
            {
                "prompt_ids": encode_prompt(tok, prompt),
                "completion_ids": completion,
                "reward": float(a + b == total),
                "logp_ref": float(rng.normal(-12.0, 2.0)),
                "log_z_hat": float(rng.normal(0.0, 1.0)),
            }
        )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="transformers directory (model and tokenizer)")
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=["single", "ddp", "fsdp2"], required=True)
    p.add_argument(
        "--lora", action="store_true", help="train LoRA adapters (the harness's peft path)"
    )
    p.add_argument("--steps", type=int, default=3)
    p.add_argument(
        "--batch", type=int, default=8, help="global batch (trajectories per optimizer step)"
    )
    p.add_argument("--n", type=int, default=16, help="trajectories in the cache")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument(
        "--accumulate",
        type=int,
        default=1,
        help="micro-batches per optimizer step (single: the float-order null of DDP's split)",
    )
    p.add_argument(
        "--checkpoints",
        help="save a Lightning checkpoint after every step into this directory, "
        "and resume from its last.ckpt when there is one (as the train stage does)",
    )
    p.add_argument("--save", action="store_true", help="write the trained policy to OUT/policy")
    args = p.parse_args(argv)

    import lightning as L
    from omegaconf import OmegaConf

    from disa.losses import get_loss
    from disa.models import load_model
    from disa.scoring import pack
    from disa.tokenization import load_tokenizer
    from disa.training.data import TrajectoryDataModule
    from disa.training.module import PolicyModule
    from disa.training.run import _with_lora

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if (args.mode == "single") != (world == 1):
        raise SystemExit(
            f"--mode {args.mode} with WORLD_SIZE={world}: single runs alone, ddp/fsdp2 under torchrun"
        )
    if args.batch % (world * args.accumulate):
        raise SystemExit(
            f"--batch {args.batch} does not split over {world} processes × {args.accumulate} micro-batches"
        )

    t0 = time.perf_counter()
    L.seed_everything(0, verbose=False)  # the same LoRA initialisation in every process
    tok = load_tokenizer(args.model)
    policy = load_model(args.model, "float32").train()
    if args.lora:
        lora = OmegaConf.create(
            {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"]}
        )
        policy = _with_lora(policy, lora)
    trainable = [n for n, p_ in policy.named_parameters() if p_.requires_grad]
    leader = int(os.environ.get("RANK", "0")) == 0
    init = (
        {n: p_.detach().clone() for n, p_ in policy.named_parameters() if p_.requires_grad}
        if leader
        else {}
    )

    # DISA: a mean over trajectories, so equal shares averaged are the global mean. (SFT's
    # token-mean over each rank's rewarded tokens would not be: ranks hold different counts.)
    spec = get_loss("disa")
    options = spec.make_options({}, beta=2.0)
    opt = (
        functools.partial(torch.optim.SGD, lr=args.lr)
        if args.optimizer == "sgd"
        else functools.partial(torch.optim.AdamW, lr=args.lr, weight_decay=0.0)
    )
    if args.mode == "fsdp2":
        from disa.training.sharded import ShardedPolicyModule as module_class
    else:
        module_class = PolicyModule
    module = module_class(policy, spec, options, opt, chunk_size=args.chunk_size)
    frame = trajectories(tok, args.n)
    # each process takes batch/world items of global batch b (disa.training.data.StepBatches)
    data = TrajectoryDataModule(
        frame, args.batch // world // args.accumulate, tok.pad_token_id, seed=11
    )

    # per (micro-)batch: the mean over the ranks' equal shares = the global loss
    losses: list[float] = []
    local_batch: list[int] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"].detach().clone()
            if world > 1:
                torch.distributed.all_reduce(loss)
                loss /= world
            losses.append(float(loss))
            local_batch.append(len(batch["reward"]))

    if args.mode == "single":
        strategy = "auto"
    elif args.mode == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend="gloo")
    else:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(
            data_parallel_size=world, tensor_parallel_size=1, save_distributed_checkpoint=False
        )
    callbacks: list = [Record()]
    resume = None
    if args.checkpoints:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(
            ModelCheckpoint(dirpath=args.checkpoints, save_last=True, every_n_train_steps=1)
        )
        last = Path(args.checkpoints) / "last.ckpt"
        resume = str(last) if last.exists() else None
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulate,
        precision="32-true",
        gradient_clip_val=1.0,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=bool(args.checkpoints),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    t_fit = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    fit_s = time.perf_counter() - t_fit

    # The trained weights, whole: gathered from the shards under FSDP2 (every rank takes part).
    if args.mode == "fsdp2":
        from disa.training.sharded import gather_full_state, save_pretrained, strip_prefix

        state = strip_prefix(gather_full_state(module), "policy.")
    else:
        state = {n: p_.detach() for n, p_ in module.policy.named_parameters()}
    params = {n: state[n].clone() for n in trainable} if trainer.global_rank == 0 else {}

    # A probe batch, scored the way the run trains (through the FSDP2 root when sharded).
    probe = pack(frame.prompt_ids[:4].tolist(), frame.completion_ids[:4].tolist(), tok.pad_token_id)
    module.eval()
    with torch.no_grad():
        logp = module.logprobs(probe)
        logits = None
        if args.mode == "single":
            logits = module.policy(
                input_ids=probe.input_ids,
                attention_mask=probe.attention_mask,
                position_ids=probe.position_ids,
                use_cache=False,
            ).logits
    if args.save:
        if args.mode == "fsdp2":
            if args.lora:
                raise SystemExit(
                    "--save of a sharded LoRA policy goes through disa.training.run.unsharded_policy"
                )
            save_pretrained(module.root, out / "policy", tok)
        elif trainer.global_rank == 0:
            final = module.policy.merge_and_unload() if args.lora else module.policy
            final.save_pretrained(out / "policy")
            tok.save_pretrained(out / "policy")

    if trainer.global_rank == 0:
        torch.save(params, out / "params.pt")
        torch.save(
            {
                "input_ids": probe.input_ids,
                "attention_mask": probe.attention_mask,
                "position_ids": probe.position_ids,
                "completion_mask": probe.completion_mask,
                "logp": logp,
                "logits": logits,
            },
            out / "probe.pt",
        )
        moved = [(params[n] - init[n]).double() for n in trainable]
        stats = {
            "mode": args.mode,
            "world_size": world,
            "steps": int(trainer.global_step),
            "losses": losses,
            "trainable": len(trainable),
            "trainable_numel": int(sum(t.numel() for t in moved)),
            "moved_max_abs": max(float(d.abs().max()) for d in moved),
            "moved_norm": float(torch.sqrt(sum((d**2).sum() for d in moved))),
            "local_batch": local_batch,
            "fit_s": fit_s,
            "total_s": time.perf_counter() - t0,
        }
        (out / "stats.json").write_text(json.dumps(stats, indent=1))


# -- for the tests: launching the worker and comparing two runs ---------------------------------
REPO = Path(__file__).resolve().parents[1]


def launch(args: list[str], nproc: int, timeout: float = 300) -> str:
    """Run the worker with ``args`` as one process (``nproc=1``) or as ``nproc`` ranks of a
    ``torchrun --standalone`` launch (a free rendezvous port, so parallel tests do not clash). Returns the log; raises with its tail on failure. A launch still
    running after ``timeout`` seconds is killed with its whole process group (torchrun and
    every rank), so that a hung collective cannot hang the test session."""
    script = [str(Path(__file__).resolve()), *args]
    cmd = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            *script,
        ]
        if nproc > 1
        else [sys.executable, *script]
    )
    # One thread per process, the single one included: on a busy machine an OpenMP team whose
    # threads get descheduled waits on its barriers, which made a 2-thread run several times slower.
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        raise AssertionError(
            f"{' '.join(cmd)} ran past {timeout} s and was killed:\n{log[-4000:]}"
        ) from None
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{log[-6000:]}")
    return log


def compare(reference: Path, other: Path) -> dict[str, float]:
    """How far run ``other``'s trained parameters (and probe log-probs) are from ``reference``'s:
    the largest absolute difference, the difference's norm relative to how far training moved
    the reference's weights (``‖θ_other − θ_ref‖ / ‖θ_ref − θ_0‖``), that movement's largest
    element, and the largest difference of the probe's per-token log-probs."""
    a, b = torch.load(reference / "params.pt"), torch.load(other / "params.pt")
    if a.keys() != b.keys():
        raise AssertionError(f"different trainable parameters: {sorted(a.keys() ^ b.keys())[:5]}")
    diff = {k: (a[k] - b[k]).double() for k in a}
    stats = json.loads((reference / "stats.json").read_text())
    pa, pb = torch.load(reference / "probe.pt"), torch.load(other / "probe.pt")
    mask = pa["completion_mask"].bool()
    return {
        "max_abs": max(float(d.abs().max()) for d in diff.values()),
        "rel": float(torch.sqrt(sum((d**2).sum() for d in diff.values()))) / stats["moved_norm"],
        "moved_max_abs": stats["moved_max_abs"],
        "probe_logp_max_abs": float((pa["logp"] - pb["logp"])[mask].abs().max()),
    }


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    main()
