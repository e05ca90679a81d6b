"""The run's settings, resolved once from the validated config and passed down to every stage.

The composed Hydra config is the source of truth for reproducing a run; this frozen object
is what the code reads. Values that are derived (the mixture components sampled, the
realised proposal strength ``λ_eff``, whether the loss needs the reference model) are
derived here and nowhere else, and every stream of randomness takes its seed from
:func:`derive_seed`.

Settings of one component (the sampler, the evaluation, the Lightning trainer, the
optimizer) stay in their config groups and are read by the one module that builds that
component.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

#: the mixture components each proposal kind samples from
COMPONENTS = {"ref": ("ref",), "model": ("proposal",), "mixture": ("ref", "proposal")}

#: seeds are drawn from [0, SEED_RANGE): what every engine accepts (numpy, vLLM, CUDA)
SEED_RANGE = 2**31


def derive_seed(seed: int, *parts: str | int) -> int:
    """The seed of one stream of randomness: a hash of the run's ``seed`` and the stream's
    name, e.g. ``derive_seed(0, "sample", "ref", 3)`` for shard 3 of π_ref's samples.

    Streams named differently are unrelated, whatever the numbers in them: a hash never
    folds one part into another the way ``seed * C + shard`` or a final ``% 2**31`` can
    (``rank · 2**40 % 2**31`` is 0 for every rank).

    >>> derive_seed(0, "sample", "ref", 0) != derive_seed(0, "sample", "ref", 1)
    True
    """
    text = repr((int(seed), *parts)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") % SEED_RANGE


@dataclass(frozen=True)
class Settings:
    """What a job's stages read, typed and checked once (see :meth:`from_config`)."""

    beta: float  #: inverse temperature β of the target p* ∝ π_ref · exp(β r)
    seed: int  #: the run's seed; every stream derives its own from it (:meth:`derive_seed`)
    stage: str  #: "all", or the one stage this job runs
    # -- the proposal μ and the anchor
    proposal_kind: str  #: ref | model | mixture
    components: tuple[str, ...]  #: mixture components sampled ("ref", "proposal")
    strength: float  #: λ as configured: 0 for kind=ref, 1 for kind=model
    strength_effective: (
        float  #: λ_eff = round(λK)/K, the fraction actually sampled from the proposal
    )
    num_samples: int  #: K, proposal samples per prompt for log Ẑ (and DISA's training set)
    min_ess: float  #: prompts whose ESS is below this are flagged degenerate
    # -- the algorithm
    algorithm: str  #: name recorded in summaries (algorithm.name)
    loss: str  #: key in the loss registry (algorithm.loss)
    online: bool  #: samples from the current policy (FlowRL, GRPO, GSPO) instead of the cache
    loss_options: Any  #: the loss's options (algorithm.loss_args; β and norm_len = sampler.max_new_tokens where the loss takes them)
    # -- sizes
    sample_batch_size: int  #: sequences per generation call (sampler.batch_size)
    prompts_per_shard: int  #: prompts per shard of the sample stage (a resume point)
    score_batch_size: int  #: sequences per scoring forward pass (scoring.batch_size)
    chunk_size: int  #: rows of the vocabulary projection computed at once (scoring.chunk_size; scoring and training)
    logprob_impl: (
        str  #: backend of the training's log-probs (scoring.logprob_impl): chunked | liger | cce
    )
    train_batch_size: int  #: trajectories per optimizer step (algorithm.batch_size)
    eval_k: int  #: samples per held-out prompt (eval.k)
    chat_template: (
        bool  #: prompts are wrapped in the tokenizer's chat template (task.chat_template)
    )

    @classmethod
    def from_config(cls, cfg) -> Settings:
        """The settings of a config that :func:`disa.config.validate` accepted."""
        # imported here: samplers and data loaders import this module for derive_seed alone
        from disa.anchor import split_counts
        from disa.losses import get_loss

        p, alg = cfg.proposal, cfg.algorithm
        K, lam = int(p.num_samples), float(p.strength)
        return cls(
            beta=float(cfg.beta),
            seed=int(cfg.seed),
            stage=str(cfg.stage),
            proposal_kind=str(p.kind),
            components=COMPONENTS[p.kind],
            strength=lam,
            strength_effective=split_counts(K, lam)[1] / K,
            num_samples=K,
            min_ess=float(p.min_ess),
            algorithm=str(alg.name),
            loss=str(alg.loss),
            online=bool(alg.online),
            loss_options=get_loss(alg.loss).make_options(
                OmegaConf.to_container(alg.loss_args, resolve=True),
                beta=float(cfg.beta),
                max_new_tokens=int(cfg.sampler.max_new_tokens),
            ),
            sample_batch_size=int(cfg.sampler.batch_size),
            prompts_per_shard=int(cfg.sampler.prompts_per_shard),
            score_batch_size=int(cfg.scoring.batch_size),
            chunk_size=int(cfg.scoring.chunk_size),
            logprob_impl=str(cfg.scoring.get("logprob_impl", "chunked")),
            train_batch_size=int(alg.batch_size),
            eval_k=int(cfg.eval.k),
            chat_template=bool(cfg.task.get("chat_template", False)),
        )

    @property
    def loss_spec(self):
        """The registered loss (:class:`disa.losses.LossSpec`)."""
        from disa.losses import get_loss

        return get_loss(self.loss)

    @property
    def loads_reference(self) -> bool:
        """Whether training loads π_ref: an online loss that reads reference log-probs
        (FlowRL; GRPO with a KL term). Offline, they come from the cache."""
        return self.online and self.loss_spec.reads_reference(self.loss_options)

    def derive_seed(self, *parts: str | int) -> int:
        """The seed of the stream named ``parts`` in this run (:func:`derive_seed`)."""
        return derive_seed(self.seed, *parts)
