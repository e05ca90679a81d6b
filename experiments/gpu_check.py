"""The GPU acceptance check: every GPU-only path of the harness, on one GPU, in a few minutes.

    bash experiments/gpu_check.sh --out DIR                  # on a CUDA machine (see the .sh)
    python experiments/gpu_check.py --device cpu --tiny      # dry run on a CPU, tiny sizes

Sections, each timed; a failing one is recorded with its error and the others still run:

- ``env``: the device and the versions of what the harness imports;
- ``backbone``: a causal LM of Qwen2.5-0.5B's shape (vocabulary 151,936, tied embeddings) with
  random weights, saved in bf16 with the sumpairs character tokenizer (its 16 tokens are ids of
  the big vocabulary; a random model's other ids decode to nothing);
- ``disa``: ``run.py backbone=hf trainer=gpu algorithm=disa`` end to end (sample → score →
  anchor → train in bf16-mixed → evaluate);
- ``grpo``: the same with the online GRPO (generation, old-policy pass and updates on the GPU);
- ``fused``: DISA trained through ``scoring.logprob_impl`` = the first fused backend installed,
  from the rollouts, scores and anchor that ``disa`` cached;
- ``fsdp2``: DISA under ``trainer=fsdp2 trainer.devices=1`` (FSDP2 over NCCL, bf16 autocast over
  fp32 shards, the gather on rank 0), from the same cache;
- ``benchmark``: ``experiments/benchmark.py`` at sequence lengths 1024, 2048 and 4096
  (tokens/s, MFU, peak memory) for DISA against SFT, the naive path and the fused backends;
- ``pytest``: the tests marked ``gpu`` (the fused backends against the chunked path).

The runs differ in ``trainer.max_steps`` so that each trains rather than reusing another's
``train`` artifact (the strategy and the log-prob backend are not part of its key: they do not
change what is computed). Writes ``gpu_check.json``, ``gpu_check.md`` (the tables for
docs/PERFORMANCE.md) and ``gpu_check.log`` (every command's output) into ``--out``, after each
section, so a run stopped at its time limit keeps what it finished.

``--device cpu --tiny`` runs the same sections with a 2-layer, 64-wide model and a 4,096-token
vocabulary on ``trainer=cpu`` / ``trainer=fsdp2_cpu`` (one process) and the benchmark's
``--quick`` sizes; the fused backends are reported as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "experiments")]

import benchmark  # noqa: E402

FUSED = ("liger", "cce")
#: the distributions whose versions the report records
PACKAGES = (
    "torch",
    "transformers",
    "lightning",
    "peft",
    "hydra-core",
    "omegaconf",
    "triton",
    "liger-kernel",
    "cut-cross-entropy",
    "pandas",
    "pyarrow",
)


class Check:
    """The sections run so far, written out after each one."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = self.out / "gpu_check.log"
        self.log.write_text("")
        self.result: dict[str, Any] = {
            "command": " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "device": args.device,
            "tiny": args.tiny,
            "sections": {},
        }

    def section(self, name: str, fn, *a) -> Any:
        """Run ``fn(*a)`` as section ``name``: its return value is the section's figures."""
        if name not in self.args.sections:
            return None
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            value = fn(*a)
            entry = {
                "status": "skipped" if isinstance(value, Skipped) else "ok",
                "figures": value.reason if isinstance(value, Skipped) else value,
            }
        except Exception as e:  # recorded; the next sections still run
            value = None
            entry = {"status": "failed", "error": f"{type(e).__name__}: {e}"[-4000:]}
            self.write_log(f"\n== {name} failed\n{traceback.format_exc()}")
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        self.result["sections"][name] = entry
        print(
            f"== {name}: {entry['status']} ({entry['seconds']} s)"
            + (f": {entry['error'].splitlines()[-1]}" if entry["status"] == "failed" else ""),
            flush=True,
        )
        self.save()
        return value

    def write_log(self, text: str) -> None:
        with self.log.open("a") as f:
            f.write(text)

    def run(self, cmd: list[str], label: str, timeout: int) -> str:
        """Run ``cmd`` from the repository root, its output appended to the log; raise if it fails."""
        env = {
            **os.environ,
            "WANDB_MODE": "disabled",
            "HYDRA_FULL_ERROR": "1",
            "TQDM_DISABLE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
            )
            out, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:  # its partial output may be bytes
            partial = [
                x.decode(errors="replace") if isinstance(x, bytes) else x or ""
                for x in (e.stdout, e.stderr)
            ]
            out, rc = "".join(partial) + f"\nTIMEOUT after {timeout} s", None
        self.write_log(
            f"\n== {label} ({time.perf_counter() - t0:.1f} s, exit {rc})\n$ {' '.join(cmd)}\n{out}"
        )
        if rc != 0:
            tail = "\n".join(out.strip().splitlines()[-15:])
            raise RuntimeError(f"{label} exited {rc}:\n{tail}")
        return out

    def save(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.result, indent=1, default=str))
        (self.out / "gpu_check.md").write_text(markdown(self.result))


class Skipped:
    def __init__(self, reason: str):
        self.reason = reason


# -- the sections --------------------------------------------------------------------------------
def env_section(args) -> dict[str, Any]:
    import importlib.metadata

    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no CUDA device")
    return {
        "python": platform.python_version(),
        "versions": versions,
        "device_name": torch.cuda.get_device_name() if cuda else platform.machine(),
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        if cuda
        else None,
        "cpu_cores": os.cpu_count(),
    }


def backbone_section(args) -> dict[str, Any]:
    """A random Qwen2.5-0.5B-shaped LM (``--tiny``: 2 layers, 64 wide, vocabulary 4,096), saved in
    bf16, with a character tokenizer as large as its vocabulary: the sumpairs characters first
    (prompts and rewards read as on the embedded task), then one character per remaining id (code
    points from U+10000), so that whatever a random model samples decodes to text."""
    import torch
    from transformers import Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    from disa.tasks.sumpairs import SumPairsTask
    from disa.tokenization import SPECIAL_TOKENS, build_char_tokenizer

    vocab = 4096 if args.tiny else benchmark.QWEN_VOCAB
    filler = vocab - len(SPECIAL_TOKENS) - len(SumPairsTask.alphabet)
    tok = build_char_tokenizer(
        SumPairsTask.alphabet + "".join(chr(0x10000 + i) for i in range(filler))
    )
    shape = (
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
        if args.tiny
        else {}
    )
    cfg = benchmark.qwen_config(vocab, max_position_embeddings=4096, **shape)
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = (
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )
    torch.manual_seed(0)
    with torch.device(args.device):  # 494M parameters: initialised where they are fast to draw
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config.pad_token_id = tok.pad_token_id
    hf_logging.disable_progress_bar()  # one bar for one file
    model.save_pretrained(args.backbone)
    tok.save_pretrained(args.backbone)
    if len(tok) != vocab:
        raise RuntimeError(f"tokenizer has {len(tok)} tokens, the model's vocabulary {vocab}")
    return {
        "path": str(args.backbone),
        "params": sum(p.numel() for p in model.parameters()),
        "vocab": vocab,
        "hidden": cfg.hidden_size,
        "layers": cfg.num_hidden_layers,
    }


def pipeline_overrides(args, run_name: str) -> list[str]:
    """Settings every run.py job shares: the random backbone, plain Monte Carlo proposals (there
    is no proposal model), small sizes, CSV logging, one cache."""
    small = (
        [
            "task.max_sum=11",
            "proposal.num_samples=4",
            "eval.k=2",
            "eval.pass_k=[1,2]",
            "algorithm.batch_size=16",
        ]
        if args.tiny
        else ["task.max_sum=23", "proposal.num_samples=16", "eval.k=4", "eval.pass_k=[1,2,4]"]
    )
    return [
        "backbone=hf",
        f"backbone.path={args.backbone}",
        "backbone.name=qwen2.5-0.5b-shape-random",
        "proposal=ref",
        "logger=csv",
        f"cache_dir={args.workdir / 'cache'}",
        f"hydra.run.dir={args.workdir / 'runs' / run_name}",
        "trainer.enable_progress_bar=false",
        "checkpoint.every_n_steps=1000",
        *small,
    ]


def run_py(check: Check, args, name: str, overrides: list[str], steps: int) -> dict[str, Any]:
    """One ``run.py`` job; its summary's training and evaluation figures."""
    trainer = (
        []
        if any(o.startswith("trainer=") for o in overrides)
        else [f"trainer={'gpu' if args.device == 'cuda' else 'cpu'}"]
    )
    cmd = [
        sys.executable,
        str(REPO / "run.py"),
        *pipeline_overrides(args, name),
        *trainer,
        *overrides,
        f"trainer.max_steps={steps}",
    ]
    check.run(cmd, name, args.timeout)
    summary = json.loads((args.workdir / "runs" / name / "summary.json").read_text())
    keys = (
        "algorithm",
        "train.steps",
        "train.wall_s",
        "train.loss",
        "train.tokens_generated",
        "ref.mean_at_k",
        "policy.mean_at_k",
        "anchor.mean_abs_error",
        "time.sample_s",
        "time.score_s",
        "time.train_s",
        "time.evaluate_s",
        "time.total_s",
    )
    figures = {k: summary[k] for k in keys if k in summary}
    figures |= {k: v for k, v in summary.items() if k.startswith("reused.")}
    if figures.get("train.steps") != steps:
        raise RuntimeError(f"{name}: trained {figures.get('train.steps')} steps, expected {steps}")
    return figures


def fused_backend(args) -> tuple[str | None, dict[str, str]]:
    """The first fused backend that can train here, and why each other one cannot."""
    from disa.scoring import logprob_impl_problem

    why = {
        i: logprob_impl_problem(i, on_cuda=args.device == "cuda", half_precision=True)
        for i in FUSED
    }
    return next((i for i in FUSED if why[i] is None), None), {i: w for i, w in why.items() if w}


def fused_section(check: Check, args) -> dict[str, Any] | Skipped:
    impl, why = fused_backend(args)
    if impl is None:
        return Skipped("; ".join(why.values()))
    return run_py(
        check,
        args,
        f"disa_{impl}",
        ["algorithm=disa", f"scoring.logprob_impl={impl}"],
        args.steps - 2,
    )


def fsdp2_section(check: Check, args) -> dict[str, Any]:
    preset = (
        ["trainer=fsdp2", "trainer.devices=1"]
        if args.device == "cuda"
        else ["trainer=fsdp2_cpu", "trainer.devices=1"]
    )
    return run_py(check, args, "disa_fsdp2", ["algorithm=disa", *preset], args.steps - 1)


def benchmark_section(check: Check, args) -> dict[str, Any]:
    out = args.workdir / "benchmark.json"
    sizes = (
        ["--preset", "qwen0.5b", "--seq-lens", "1024,2048,4096", "--warmup", "1", "--reps", "3"]
        if not args.tiny
        else ["--preset", "qwen0.5b", "--quick"]
    )
    check.run(
        [
            sys.executable,
            str(REPO / "experiments" / "benchmark.py"),
            "--device",
            args.device,
            *sizes,
            "--skip-online",
            "--impls",
            ",".join(FUSED),
            "--out",
            str(out),
        ],
        "benchmark",
        args.timeout,
    )
    return json.loads(out.read_text())


def pytest_section(check: Check, args) -> dict[str, Any]:
    """The tests marked gpu (on a CPU they are collected and skipped)."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "gpu",
        "-p",
        "no:cacheprovider",
        "--no-header",
        "-rs",
        "tests/test_logprob_backends.py",
        "tests/test_scale.py",
    ]
    out = check.run(cmd, "pytest -m gpu", args.timeout)
    counts = {
        k: int(n)
        for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", out.splitlines()[-1])
    }
    return {"counts": counts, "last_line": out.strip().splitlines()[-1]}


# -- the report ------------------------------------------------------------------------------------
def markdown(result: dict[str, Any]) -> str:
    """The sections' status and figures, and the benchmark's tables, as markdown."""
    secs = result["sections"]
    lines = [f"GPU check, {result['date']}: `{result['command']}`", ""]
    env = (secs.get("env") or {}).get("figures") or {}
    if env:
        v = {k: x for k, x in env["versions"].items() if x}
        lines += [
            f"Device: {env['device_name']}"
            + (f" ({env['gpu_memory_gib']} GiB)" if env.get("gpu_memory_gib") else "")
            + f", Python {env['python']}; "
            + ", ".join(f"{k} {x}" for k, x in v.items()),
            "",
        ]
    lines += ["| section | status | seconds | figures |", "|---|---|---|---|"]
    for name, s in secs.items():
        what = (
            s.get("error", "").splitlines()[-1]
            if s["status"] == "failed"
            else _brief(name, s.get("figures"))
        )
        lines.append(f"| {name} | {s['status']} | {s['seconds']} | {what} |")
    bench = (secs.get("benchmark") or {}).get("figures")
    if bench:
        lines += ["", benchmark.report(bench)]
    return "\n".join(lines) + "\n"


def _brief(name: str, figures: Any) -> str:
    if isinstance(figures, str) or figures is None:
        return (figures or "").replace("|", "/")
    if name == "benchmark":
        return f"{len(figures['steps'])} step rows, {len(figures['scoring'])} scoring rows"
    if name == "env":
        return ""
    keep = (
        "train.steps",
        "train.wall_s",
        "train.loss",
        "policy.mean_at_k",
        "train.tokens_generated",
        "time.total_s",
        "params",
        "vocab",
        "counts",
    )
    return ", ".join(f"{k}={_fmt(v)}" for k, v in figures.items() if k in keep)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    sections = ["env", "backbone", "disa", "grpo", "fused", "fsdp2", "benchmark", "pytest"]
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny model and sizes (the CPU dry run)")
    p.add_argument(
        "--out", default="outputs/gpu_check", help="where gpu_check.json, .md and .log go"
    )
    p.add_argument(
        "--workdir", default=None, help="backbone, cache and run directories (default: OUT/work)"
    )
    p.add_argument(
        "--sections", default=",".join(sections), help=f"comma-separated subset of {sections}"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps of the DISA run (default 8; tiny 3)",
    )
    p.add_argument(
        "--timeout",
        type=int,
        default=None,
        help="seconds allowed to each command (default 300; tiny 900)",
    )
    a = p.parse_args(argv)
    a.sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    unknown = sorted(set(a.sections) - set(sections))
    if unknown:
        p.error(f"--sections has {unknown}; allowed: {sections}")
    a.workdir = Path(a.workdir or Path(a.out) / "work").resolve()
    a.backbone = a.workdir / "backbone"
    a.steps = a.steps or (3 if a.tiny else 8)
    a.timeout = a.timeout or (900 if a.tiny else 300)
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("hydra") is None:
        print(
            "hydra-core is not importable: run experiments/gpu_check.sh (it installs the wheels of `make "
            "gpu-wheels` from .whl/) or install the harness's requirements",
            file=sys.stderr,
        )
        return 2
    check = Check(args)
    check.section("env", env_section, args)
    check.section("backbone", backbone_section, args)
    check.section("disa", run_py, check, args, "disa", ["algorithm=disa"], args.steps)
    check.section("grpo", run_py, check, args, "grpo", ["algorithm=grpo"], args.steps)
    check.section("fused", fused_section, check, args)
    check.section("fsdp2", fsdp2_section, check, args)
    check.section("benchmark", benchmark_section, check, args)
    check.section("pytest", pytest_section, check, args)
    failed = [n for n, s in check.result["sections"].items() if s["status"] == "failed"]
    print(
        f"wrote {check.out / 'gpu_check.json'}, gpu_check.md and gpu_check.log; "
        + (f"FAILED: {', '.join(failed)}" if failed else "no section failed"),
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
