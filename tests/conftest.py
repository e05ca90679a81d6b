"""Shared fixtures: the repository root and a tiny random Llama model with a char tokenizer."""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path, env: dict[str, str], timeout: float = 600):
    """``python run.py *args`` in a subprocess started in ``cwd``, its output captured as text."""
    return subprocess.run(
        [sys.executable, str(REPO / "run.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny_llama(vocab_size: int, *, seed: int = 0, init_std: float = 0.1, special=(0, 1, 2)):
    """A 2-layer, 32-wide random ``LlamaForCausalLM``. ``init_std`` well above the usual
    0.02 makes next-token distributions uneven (so top-k and top-p bite)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    pad, bos, eos = special
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        initializer_range=init_std,
        tie_word_embeddings=False,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="module")
def make_cfg(repo):
    """``make_cfg(*overrides)``: the config ``run.py`` composes with those overrides."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(repo / "conf"), version_base="1.3"):
        yield lambda *overrides: compose("config", overrides=list(overrides))


@pytest.fixture(scope="session")
def char_tok():
    """Character tokenizer over "abcdef": ids 0..3 are <pad>, <bos>, <eos>, <unk>."""
    from disa.tokenization import build_char_tokenizer

    return build_char_tokenizer("abcdef")


@pytest.fixture(scope="session")
def tiny_model(char_tok):
    return tiny_llama(
        len(char_tok), special=(char_tok.pad_token_id, char_tok.bos_token_id, char_tok.eos_token_id)
    )
