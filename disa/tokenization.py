"""Tokenizers and prompt encoding: the one place that turns text into token ids and back.

The embedded backbone's character-level tokenizer, loading a model's own tokenizer, the chat
template, and the two conversions every stage must agree on: a prompt's ids
(:func:`encode_prompt`) and the text a reward sees (:func:`completion_text`).
"""

from __future__ import annotations

from typing import Any

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def build_char_tokenizer(alphabet: str):
    """A character-level fast tokenizer: one token per character, ``<bos>`` prepended."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + list(alphabet))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # join characters back without spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:  # many causal LMs ship without one; padding is masked anyway
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def apply_chat_template(
    tokenizer: Any, text: str, *, system: str | None = None, **kwargs: Any
) -> str:
    """``text`` as a single user turn in the tokenizer's chat format, with the generation
    prompt appended; ``text`` unchanged when the tokenizer has no chat template (base
    models, the embedded char tokenizer)."""
    if not getattr(tokenizer, "chat_template", None):
        return text
    messages: list[dict[str, str]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": text})
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kwargs
    )


def encode_prompt(tokenizer, text: str, chat: bool = False) -> list[int]:
    """Token ids of a prompt: wrapped in the tokenizer's chat template when ``chat`` and the
    tokenizer has one (the template already holds the special tokens, so none are added)."""
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer(apply_chat_template(tokenizer, text), add_special_tokens=False).input_ids
    return tokenizer(text).input_ids


def completion_text(tokenizer, ids: list[int]) -> str:
    """The text a reward sees: the completion without its final EOS, special tokens *kept*.

    Skipping special tokens would let e.g. ``"3<bos>+4"`` read as ``"3+4"`` and be rewarded
    although it is not in the rewarded set, which would make the exact oracle disagree with
    the rewards the pipeline assigns.
    """
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False)
