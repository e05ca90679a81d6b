"""Sampling with transformers' ``generate``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from disa.sampling import SamplerSettings


class HFSampler:
    def __init__(self, batch_size: int = 256):
        self.batch_size = batch_size

    @torch.no_grad()
    def sample(
        self,
        model,
        tokenizer,
        prompt_ids: Sequence[Sequence[int]],
        n: int,
        settings: SamplerSettings,
        seed: int,
    ) -> list[list[list[int]]]:
        """``n`` completions per prompt, as token ids ending with EOS when the model stopped
        (no EOS when it hit ``max_new_tokens``). Deterministic given ``seed``."""
        from transformers import GenerationConfig

        device = next(model.parameters()).device
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        gen = GenerationConfig(
            do_sample=True,
            temperature=settings.temperature,
            top_k=settings.top_k,  # 0 disables; explicit so a model's generation_config can't add one
            top_p=settings.top_p,
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            num_return_sequences=n,
        )
        per_batch = max(1, self.batch_size // n)
        out: list[list[list[int]]] = []
        torch.manual_seed(seed)
        for s in range(0, len(prompt_ids), per_batch):
            chunk = prompt_ids[s : s + per_batch]
            enc = _left_padded(chunk, pad, device)
            seqs = model.generate(**enc, generation_config=gen)
            seqs = seqs[:, enc["input_ids"].shape[1] :].tolist()
            for i in range(len(chunk)):
                out.append([_until_eos(c, eos) for c in seqs[i * n : (i + 1) * n]])
        return out


def _left_padded(prompts: Sequence[Sequence[int]], pad: int, device) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[B, P]``: the prompts left-padded to the longest,
    as ``generate`` takes them. (``tokenizer.pad`` gives the same, but transformers 4 then
    advises, once per tokenizer, to call the tokenizer on text instead: a repeated log line.)"""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, P - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, P - len(p) :] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids
