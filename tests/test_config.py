"""disa.config.validate on the real config tree, composed with Hydra's compose API."""

from __future__ import annotations

import re

import pytest
from hydra.errors import HydraException, MissingConfigException

from disa.config import ConfigError, validate


def _errors(cfg) -> str:
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    return str(e.value)


def test_default_config_validates(make_cfg):
    cfg = make_cfg()
    validate(cfg)
    assert cfg.beta > 0 and cfg.proposal.kind == "mixture" and cfg.backbone.kind == "embedded"


@pytest.mark.parametrize(
    "overrides",
    [
        ["debug=fast"],
        ["proposal=ref"],
        ["proposal=model"],
        ["proposal.strength=0"],
        ["proposal.strength=1"],
        ["beta=0.01"],
        ["eval.pass_k=[1,16]"],
        ["sampler.top_p=1.0", "sampler.top_k=0"],
    ],
)
def test_valid_variants(make_cfg, overrides):
    validate(make_cfg(*overrides))


@pytest.mark.parametrize(
    ("override", "setting", "allowed"),
    [
        ("beta=0", "beta", "(0, 1e4]"),
        ("beta=-1", "beta", "(0, 1e4]"),
        ("beta=20000", "beta", "(0, 1e4]"),  # beta=1e308 once passed and trained all-NaN weights
        ("proposal.strength=1.5", "proposal.strength", "[0, 1]"),
        ("proposal.strength=-0.1", "proposal.strength", "[0, 1]"),
        ("proposal.num_samples=0", "proposal.num_samples", ">= 1"),
        ("proposal.num_samples=2.5", "proposal.num_samples", ">= 1"),
        ("sampler.top_p=0", "sampler.top_p", "(0, 1]"),
        ("sampler.temperature=0", "sampler.temperature", "[1e-3, 1e3]"),
        ("sampler.top_k=-1", "sampler.top_k", ">= 0"),
        ("seed=-3", "seed", ">= 0"),
        ("stage=fit", "stage", "sample"),
        ("eval.pass_k=[1,99]", "eval.pass_k", "[1, eval.k=16]"),
        ("algorithm.loss=nope", "algorithm.loss", "disa"),
        ("lr_schedule.decay=step", "lr_schedule.decay", "['constant', 'linear', 'cosine']"),
        ("lr_schedule.warmup_steps=-1", "lr_schedule.warmup_steps", "an integer >= 0"),
        ("lr_schedule.warmup_steps=300", "lr_schedule.warmup_steps", "below trainer.max_steps=300"),
    ],
)
def test_invalid_setting_is_named_with_what_is_allowed(make_cfg, override, setting, allowed):
    msg = _errors(make_cfg(override))
    line = next((ln for ln in msg.splitlines() if ln.strip().startswith(f"- {setting}")), None)
    assert line is not None, msg
    assert allowed in line, line
    value = override.split("=", 1)[1]
    assert value.strip("[]").split(",")[-1] in line, line  # the offending value is shown


def test_hf_backbone_with_missing_path(make_cfg, tmp_path):
    msg = _errors(make_cfg("backbone=hf", "backbone.path=/nonexistent"))
    assert re.search(
        r"backbone\.path='/nonexistent' does not exist; allowed: a local model directory", msg
    ), msg
    # with proposal=ref no proposal model is needed, and an existing path is accepted
    msg = _errors(make_cfg("backbone=hf", "backbone.path=/nonexistent", "proposal=ref"))
    assert "proposal.model_path" not in msg
    validate(make_cfg("backbone=hf", f"backbone.path={tmp_path}", "proposal=ref"))
    # mixture needs a proposal model
    msg = _errors(make_cfg("backbone=hf", f"backbone.path={tmp_path}"))
    assert "proposal.model_path" in msg and "backbone.path" not in msg


def test_unknown_group_option_lists_available(make_cfg):
    with pytest.raises((MissingConfigException, HydraException)) as e:
        make_cfg("algorithm=nope")
    msg = str(e.value)
    assert "algorithm/nope" in msg and "Available options" in msg and "disa" in msg


def test_several_errors_reported_at_once(make_cfg):
    msg = _errors(
        make_cfg("beta=0", "proposal.strength=1.5", "sampler.top_p=0", "proposal.num_samples=0")
    )
    for setting in ("beta", "proposal.strength", "sampler.top_p", "proposal.num_samples"):
        assert f"- {setting}=" in msg, msg
    assert msg.count("\n  - ") == 4


def test_several_errors_across_kinds_reported_at_once(make_cfg):
    """The module promises every problem at once; a range error must not hide a
    cross-setting error (here an unregistered loss and an out-of-range pass@k)."""
    msg = _errors(make_cfg("beta=0", "algorithm.loss=nope", "eval.pass_k=[1,99]"))
    for setting in ("beta", "algorithm.loss", "eval.pass_k"):
        assert f"- {setting}=" in msg, msg
