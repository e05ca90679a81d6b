"""How far vLLM's log-probs of its own samples are from the harness's scorer, on SmolLM2-135M.

    .venv-vllm/bin/python experiments/vllm_logprob_gap.py                  # 32 prompts × 8, three settings
    .venv-vllm/bin/python experiments/vllm_logprob_gap.py --settings 1.0,0,1.0 --out /tmp/gap.json

For each sampler setting (``temperature,top_k,top_p``), :class:`disa.sampling.vllm.VLLMSampler`
draws ``--samples`` completions per few-shot prompt and reports its *processed* log-prob of
every sampled token (``logprobs_mode=processed_logprobs``: the distribution it sampled from,
after temperature, top-k and top-p); :func:`disa.scoring.token_logprobs` re-scores the same
tokens under the same settings with the transformers model. Printed: the absolute gap per
token and per sequence (max and mean), and the samples the scorer gives probability 0 (a
token outside its top-k/top-p set that vLLM kept). ``sampler.logprob_tolerance``
(conf/sampler/vllm.yaml) is set from these figures, with margin.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "experiments"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_generation import few_shot_prompts, machine, newline_tokenizer, smollm2_dir  # noqa: E402


def gaps(vllm_tok: list[list[float]], scored_tok: list[list[float]]) -> dict[str, float]:
    """Absolute gaps per token and per sequence between two ``[sequence][token]`` lists; a
    scored ``-inf`` against a finite engine value counts as "impossible" and is left out."""
    per_token, per_seq, impossible = [], [], 0
    for a, b in zip(vllm_tok, scored_tok):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if np.isneginf(b).any():
            impossible += 1
            continue
        d = a - b
        per_token.extend(np.abs(d).tolist())
        per_seq.append(abs(float(d.sum())))
    t, s = np.asarray(per_token), np.asarray(per_seq)
    return {
        "sequences": len(per_seq),
        "tokens": len(per_token),
        "scorer_impossible": impossible,
        "token_max": float(t.max()),
        "token_mean": float(t.mean()),
        "seq_max": float(s.max()),
        "seq_mean": float(s.mean()),
    }


def measure(
    path: str,
    prompts: int,
    samples: int,
    max_new_tokens: int,
    settings: list[tuple[float, int, float]],
    seed: int,
) -> list[dict]:
    from disa.models import load_model
    from disa.sampling import SamplerSettings
    from disa.sampling.vllm import VLLMSampler
    from disa.scoring import pack, token_logprobs

    tok = newline_tokenizer(path)
    ids = [tok(p).input_ids for p in few_shot_prompts(prompts)]
    model = load_model(path, "float32").eval()
    sampler = VLLMSampler(batch_size=512, seed=seed, max_model_len=256)
    out = []
    for temperature, top_k, top_p in settings:
        how = SamplerSettings(
            temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens
        )
        groups = sampler.sample(model, tok, ids, samples, how, seed=seed)
        completions = [c for g in groups for c in g]
        engine = [lp for g in sampler.last_token_logprobs for lp in g]
        batch = pack([p for p in ids for _ in range(samples)], completions, tok.pad_token_id)
        with torch.no_grad():
            scored = token_logprobs(model, batch, temperature=temperature, top_k=top_k, top_p=top_p)
        scored_tok = [scored[i, : len(c)].tolist() for i, c in enumerate(completions)]
        out.append(
            {"temperature": temperature, "top_k": top_k, "top_p": top_p, **gaps(engine, scored_tok)}
        )
    sampler.close()
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument(
        "--settings",
        default="1.0,0,1.0;1.0,20,0.9;0.7,0,0.95",
        help="temperature,top_k,top_p; … (top_k 0 and top_p 1 disable)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    settings = [
        (float(t), int(k), float(p)) for t, k, p in (s.split(",") for s in args.settings.split(";"))
    ]
    rows = measure(
        smollm2_dir(), args.prompts, args.samples, args.max_new_tokens, settings, args.seed
    )
    m = machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores; SmolLM2-135M float32, vLLM vs disa.scoring")
    print(
        f"{'T':>4} {'top_k':>5} {'top_p':>5} {'seqs':>5} {'tokens':>6} {'tok max':>9} {'tok mean':>9} "
        f"{'seq max':>9} {'seq mean':>9} {'p=0':>4}"
    )
    for r in rows:
        print(
            f"{r['temperature']:>4} {r['top_k']:>5} {r['top_p']:>5} {r['sequences']:>5} {r['tokens']:>6} "
            f"{r['token_max']:>9.2e} {r['token_mean']:>9.2e} {r['seq_max']:>9.2e} {r['seq_mean']:>9.2e} "
            f"{r['scorer_impossible']:>4}"
        )
    if args.out:
        args.out.write_text(json.dumps({"machine": m, "rows": rows}, indent=2))
    return rows


# the vLLM engine may start worker processes: keep the module import-safe
if __name__ == "__main__":
    main()
