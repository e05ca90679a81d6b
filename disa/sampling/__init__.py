"""Samplers: draw completions from a model behind one interface.

``HFSampler`` uses transformers' ``generate`` and runs anywhere; ``VLLMSampler``
(``sampler=vllm``, an optional extra) a vLLM engine loaded from the model's directory.
Log-probs are never taken from the sampler: :mod:`disa.scoring` re-scores every sequence
with a forward pass, so all log-probs come from one source of truth whichever engine sampled.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class SamplerSettings:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    max_new_tokens: int = 8

    def spec(self) -> dict:
        """The settings that change the sampled distribution (batch size does not)."""
        return asdict(self)

    @property
    def is_identity(self) -> bool:
        """True when the sampled density is the model's own (no processing)."""
        return self.temperature == 1.0 and self.top_k == 0 and self.top_p == 1.0

    @classmethod
    def from_cfg(cls, cfg) -> SamplerSettings:
        return cls(
            temperature=float(cfg.temperature),
            top_p=float(cfg.top_p),
            top_k=int(cfg.top_k),
            max_new_tokens=int(cfg.max_new_tokens),
        )


def build_sampler(cfg):
    """The sampler named by ``cfg.sampler.engine``."""
    if cfg.sampler.engine == "hf":
        from disa.sampling.hf import HFSampler

        return HFSampler(batch_size=int(cfg.sampler.batch_size))
    # raises VLLMMissing with the install hint where vllm is absent
    if cfg.sampler.engine == "vllm":
        from disa.sampling.vllm import VLLMSampler

        return VLLMSampler.from_cfg(cfg)
    raise ValueError(f"sampler.engine={cfg.sampler.engine!r} is not known; allowed: ['hf', 'vllm']")
