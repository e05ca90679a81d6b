"""Tokenizers and prompt encoding: the char tokenizer, the chat template, prompt ids and the
text a reward sees."""

from __future__ import annotations

from disa.tasks.sumpairs import SumPairsTask
from disa.tokenization import (
    SPECIAL_TOKENS,
    apply_chat_template,
    build_char_tokenizer,
    completion_text,
    encode_prompt,
)

ALPHABET = SumPairsTask.alphabet
# "ab" + each message + "fe": a chat template written in the "abcdef" alphabet of ``char_tok``
_AB_TEMPLATE = (
    "{% for m in messages %}ab{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}fe{% endif %}"
)


def test_char_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = build_char_tokenizer(ALPHABET)
    assert len(tok) == len(SPECIAL_TOKENS) + len(ALPHABET)
    text = "12+30=5"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert ids[1:] == [len(SPECIAL_TOKENS) + ALPHABET.index(ch) for ch in text]
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    for t in (text, "0", "59+0", "=+="):
        assert tok2(t).input_ids == tok(t).input_ids
        assert (
            tok2(t, add_special_tokens=False).input_ids
            == tok(t, add_special_tokens=False).input_ids
        )
        assert tok2.decode(tok2(t).input_ids, skip_special_tokens=True) == t  # no spaces
    assert (tok2.bos_token_id, tok2.eos_token_id, tok2.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert tok2.padding_side == "left"
    enc = tok2(["1=", "12+3="], padding=True)
    assert enc.input_ids[0] == [tok.pad_token_id] * 3 + tok("1=").input_ids
    assert enc.attention_mask[0] == [0, 0, 0, 1, 1, 1]


def test_apply_chat_template():
    tok = build_char_tokenizer("abc")
    assert apply_chat_template(tok, "hello") == "hello"  # no chat template: unchanged
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert apply_chat_template(tok, "hello") == "<|user|>hello\n<|assistant|>"
    assert apply_chat_template(tok, "hi", system="be brief") == (
        "<|system|>be brief\n<|user|>hi\n<|assistant|>"
    )


def test_encode_prompt_without_chat_template_is_plain_encoding(char_tok):
    plain = char_tok("cd").input_ids
    assert plain[0] == char_tok.bos_token_id
    assert encode_prompt(char_tok, "cd") == encode_prompt(char_tok, "cd", chat=True) == plain


def test_encode_prompt_with_chat_template_adds_no_special_tokens():
    tok = build_char_tokenizer("abcdef")
    tok.chat_template = _AB_TEMPLATE
    want = [len(SPECIAL_TOKENS) + "abcdef".index(ch) for ch in "abcdfe"]  # no <bos>
    assert encode_prompt(tok, "cd", chat=True) == want
    assert encode_prompt(tok, "cd") == tok("cd").input_ids  # chat off: the template is unused


def test_completion_text_drops_final_eos_and_keeps_special_tokens(char_tok):
    ids = char_tok("ab", add_special_tokens=False).input_ids
    bos, eos = char_tok.bos_token_id, char_tok.eos_token_id
    assert completion_text(char_tok, [*ids, eos]) == "ab"
    assert completion_text(char_tok, ids) == "ab"  # capped at max_new_tokens: no EOS
    assert completion_text(char_tok, [ids[0], bos, ids[1], eos]) == "a<bos>b"
    assert completion_text(char_tok, [*ids, eos, eos]) == "ab<eos>"
    assert completion_text(char_tok, []) == ""
