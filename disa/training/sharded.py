"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``), on GPUs or on CPU.

Why FSDP2 and not Lightning's ``FSDPStrategy``: that strategy wraps the model in FSDP1,
which refuses a CPU device, while FSDP2 shards parameters as ``DTensor``\\ s over a device
mesh of any device type, so the same code runs on 2 CPU processes (gloo) and on GPUs (NCCL).
Lightning reaches it through ``ModelParallelStrategy`` (``trainer=fsdp2_cpu``), which calls
:meth:`ShardedPolicyModule.configure_model` on every rank. Only the CPU/gloo path has run
here; ``trainer=fsdp2_cpu trainer.accelerator=gpu trainer.devices=N`` is the same code over
NCCL, untested.

Sharding units. Every decoder layer is one unit (its parameters are all-gathered just before
its forward and freed after it), and the rest (embeddings, final norm, output head) forms
the root unit. The layer class is read from the model (transformers' ``_no_split_modules``,
the classes it never splits across devices), so no backbone is named here.

Why a wrapper module is the root. FSDP2 all-gathers a unit's parameters in hooks around
that unit's ``forward``. :func:`disa.scoring.token_logprobs` calls the decoder and then reads
the output head's weight directly for its chunked vocabulary projection; neither goes
through the causal LM's own ``forward``, so with the LM as root the embeddings and the head
would still be shards when they are used. :class:`CompletionLogProbs`, whose ``forward`` is
the whole of ``token_logprobs``, is the root instead: the root unit is gathered for exactly
the span in which all of it is used, and its gradients are reduce-scattered after backward.

Saving. :func:`gather_full_state` turns the shards back into whole tensors on rank 0
(a collective: every rank calls it); :func:`unsharded_copy` puts them into a plain copy of
the model that ``save_pretrained`` writes and ``from_pretrained`` reads back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from disa.scoring import Batch, token_logprobs
from disa.training.module import PolicyModule


def decoder_layer_classes(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """The classes of ``model``'s decoder layers, found from the model itself.

    transformers lists them in ``_no_split_modules`` (e.g. ``{"LlamaDecoderLayer"}``); a peft
    model is looked through to its base model. A model without that attribute falls back to
    the class of the items of its decoder's ``layers`` list.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes and hasattr(base, "get_decoder"):
        layers = getattr(base.get_decoder(), "layers", None)
        classes = {type(m) for m in layers or ()}
    if not classes:
        raise ValueError(
            f"cannot find the decoder layers of {type(base).__name__}: it declares no "
            "_no_split_modules and its decoder has no `layers` list"
        )
    return tuple(sorted(classes, key=lambda c: c.__name__))


class CompletionLogProbs(nn.Module):
    """``forward(input_ids, attention_mask, position_ids, completion_mask)`` → the per-token
    log-probs ``[B, T]`` of :func:`disa.scoring.token_logprobs` under ``lm``.

    The root FSDP2 unit of :func:`shard` (see the module docstring for why). ``lm`` is the
    causal LM (or peft model) being trained; the wrapper has no parameters of its own.
    """

    def __init__(self, lm: nn.Module, chunk_size: int = 2048, logprob_impl: str = "chunked"):
        super().__init__()
        self.lm = lm
        self.chunk_size, self.logprob_impl = chunk_size, logprob_impl

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        completion_mask: torch.Tensor,
    ) -> torch.Tensor:
        batch = Batch(input_ids, attention_mask, position_ids, completion_mask)
        return token_logprobs(self.lm, batch, chunk_size=self.chunk_size, impl=self.logprob_impl)


def shard(
    lm: nn.Module,
    mesh=None,
    chunk_size: int = 2048,
    logprob_impl: str = "chunked",
    **fsdp_kwargs: Any,
) -> CompletionLogProbs:
    """Shard ``lm`` in place with FSDP2 over ``mesh`` (default: every rank of the default
    process group, on this process's device type) and return its :class:`CompletionLogProbs`
    root. Each decoder layer becomes one unit, then the root takes the remaining parameters
    (a tied output head shares the embedding's and stays with it).

    ``lm``'s parameters become ``DTensor`` shards (an optimizer is built over them after this
    call); ``fsdp_kwargs`` go to every ``fully_shard`` call (``mp_policy``, ``offload_policy``).
    """
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device = next(lm.parameters()).device
        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    layer_classes = decoder_layer_classes(lm)
    for module in list(lm.modules()):
        if isinstance(module, layer_classes):
            fully_shard(module, mesh=mesh, **fsdp_kwargs)
    root = CompletionLogProbs(lm, chunk_size, logprob_impl)
    fully_shard(root, mesh=mesh, **fsdp_kwargs)
    return root


def gather_full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict of ``module`` on rank 0, in CPU memory; ``{}`` on the
    other ranks. A collective: every rank must call it, in the same order."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=options)


def strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of ``state`` under ``prefix`` (e.g. ``"lm."``), with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def unsharded_copy(like: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain (unsharded) transformers model of ``like``'s class and config holding ``state``.

    The copy is built on the meta device and takes ``state``'s tensors as its parameters
    (``assign=True``), so no second random initialisation and no second copy of the
    weights is made. Tied weights (an output head sharing the embedding) are re-tied; any
    other missing or unexpected key is an error. Buffers a state dict leaves out
    (non-persistent ones such as the rotary ``inv_freq``) are copied from ``like``: FSDP
    shards parameters only, so every rank holds them whole.
    """
    with torch.device("meta"):
        copy = type(like)(like.config)
    missing, unexpected = copy.load_state_dict(state, strict=False, assign=True)
    copy.tie_weights()
    own = dict(like.named_buffers())
    for name, buf in list(copy.named_buffers()):
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            # through _buffers, so that the buffer stays non-persistent
            copy.get_submodule(owner)._buffers[attr] = own[name].detach().clone().cpu()
    tied = (
        set(getattr(copy, "_tied_weights_keys", None) or ())
        if getattr(copy.config, "tie_word_embeddings", False)
        else set()
    )
    missing = [k for k in missing if k not in tied]
    still_meta = [n for n, t in [*copy.named_parameters(), *copy.named_buffers()] if t.is_meta]
    if missing or unexpected or still_meta:
        raise RuntimeError(
            f"the gathered state does not fill {type(like).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, uninitialised {still_meta[:5]}"
        )
    return copy.eval()


def save_pretrained(root: CompletionLogProbs, path: str | Path, tokenizer=None) -> None:
    """Gather the sharded ``root`` and write its LM as a transformers checkpoint (and the
    tokenizer) into ``path`` on rank 0. A collective: every rank must call it.

    For a plain causal LM only; a peft model is merged first by the caller's own path
    (:func:`disa.training.run.unsharded_policy`), since its adapters need their config.
    """
    state = gather_full_state(root)
    if torch.distributed.get_rank() == 0:
        model = unsharded_copy(root.lm, strip_prefix(state, "lm."))
        model.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    torch.distributed.barrier()  # nobody reads the checkpoint before it is complete


# -- Lightning: ModelParallelStrategy ------------------------------------------------------------
class ShardedPolicyModule(PolicyModule):
    """:class:`~disa.training.module.PolicyModule` sharded with FSDP2 under Lightning's
    ``ModelParallelStrategy`` (``trainer=fsdp2_cpu``).

    Lightning calls :meth:`configure_model` on every rank after the process group and the
    device mesh exist and before the optimizer is built, so the optimizer holds the sharded
    parameters. The FSDP2 root (:class:`CompletionLogProbs`) is kept out of the module's
    registered children: the policy's parameters stay under ``policy.`` in the state dict
    and in checkpoints, as unsharded, instead of appearing a second time under the root.
    """

    def __init__(self, *args, fsdp_kwargs: dict[str, Any] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fsdp_kwargs = dict(fsdp_kwargs or {})
        self._root: list[CompletionLogProbs] = []  # a list, so not registered as a submodule

    def configure_model(self) -> None:
        if self._root:  # Lightning calls this again for a later validate/test on the same module
            return
        if self.device_mesh["tensor_parallel"].size() != 1:
            raise ValueError(
                "the sharded policy is data-parallel only: allowed: "
                "trainer.strategy.tensor_parallel_size=1 (data_parallel_size = the processes)"
            )
        self._root.append(
            shard(
                self.policy,
                self.device_mesh["data_parallel"],
                self.chunk_size,
                self.logprob_impl,
                **self.fsdp_kwargs,
            )
        )

    @property
    def root(self) -> CompletionLogProbs:
        """The FSDP2 root around the policy (exists once Lightning has configured the model)."""
        if not self._root:
            raise RuntimeError(
                "the policy is not sharded yet: Lightning shards it in configure_model"
            )
        return self._root[0]

    def logprobs(self, tokens: Batch) -> torch.Tensor:
        return self.root(
            tokens.input_ids, tokens.attention_mask, tokens.position_ids, tokens.completion_mask
        )
