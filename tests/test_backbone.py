"""The shipped embedded backbone: used by default without pre-training, keyed apart from a
model pre-trained here, refused when the configured recipe is not its own, and (slow) the
recipe that made it still reaches the same quality."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from disa import models
from disa.cache import Cache, spec_key
from disa.tasks import build_task


@pytest.fixture(scope="module")
def script(repo):
    sys.path.insert(0, str(repo / "experiments"))
    import embedded_backbone

    return embedded_backbone


def test_the_default_run_uses_the_shipped_checkpoints_without_pre_training(
    make_cfg, tmp_path, monkeypatch
):
    def refuse(*args, **kwargs):
        raise AssertionError(
            "the default backbone was pre-trained instead of read from the package"
        )

    monkeypatch.setattr(models, "_pretrain", refuse)
    cfg = make_cfg()
    backbone = models.resolve_backbone(cfg, build_task(cfg), Cache(tmp_path))
    recipe = models.shipped_recipe()
    for part, fp in (
        ("ref", backbone.ref_fingerprint),
        ("proposal", backbone.proposal_fingerprint),
    ):
        # the same content fingerprint a model pre-trained here with identical bytes would get
        assert fp == spec_key(
            {k: v for k, v in recipe["sha256"].items() if k.startswith(part + "/")}
        )
        copied = sorted(p.name for p in (tmp_path / "backbone").glob(f"*/{part}/*"))
        assert copied == sorted(p.name for p in (models.SHIPPED / part).iterdir())


def test_shipped_and_pretrained_backbones_are_keyed_apart(make_cfg, tmp_path):
    cfg = make_cfg()
    task = build_task(cfg)
    recipe = models.embedded_recipe(cfg, task)
    shipped = models.resolve_backbone(cfg, task, Cache(tmp_path))
    key = shipped.ref_path.split("/")[-2]
    assert key != spec_key(recipe)  # a model pre-trained here with this recipe has another artifact
    manifest = json.loads((tmp_path / "backbone" / key / "manifest.json").read_text())
    assert manifest["spec"]["source"] == "shipped" and manifest["spec"]["content"] == spec_key(
        models.shipped_recipe()["sha256"]
    )


def test_a_tampered_shipped_file_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "embedded"
    shutil.copytree(models.SHIPPED, copy)
    (copy / "ref" / "config.json").write_text((copy / "ref" / "config.json").read_text() + " ")
    with pytest.raises(
        ValueError, match=r"ref/config.json is missing or differs from .*recipe.json"
    ):
        models.shipped_recipe(copy)


def test_another_recipe_with_the_shipped_source_is_refused_by_name(make_cfg, tmp_path):
    cfg = make_cfg("backbone.pretrain.seed=1")
    with pytest.raises(
        ValueError, match=r"pretrain.seed: 0 shipped, 1 configured.*backbone.source=pretrain"
    ):
        models.resolve_backbone(cfg, build_task(cfg), Cache(tmp_path))
    cfg = make_cfg("task.max_sum=20")
    with pytest.raises(ValueError, match=r"task.max_sum: 79 shipped, 20 configured"):
        models.resolve_backbone(cfg, build_task(cfg), Cache(tmp_path))
    with pytest.raises(
        ValueError,
        match=r"backbone.source='hub' is invalid; allowed: one of \['shipped', 'pretrain'\]",
    ):
        models.resolve_backbone(make_cfg("backbone.source=hub"), build_task(cfg), Cache(tmp_path))


def test_the_shipped_models_have_the_recorded_quality(make_cfg, script):
    """recipe.json's exact P(correct) is that of the files shipped beside it."""
    cfg = make_cfg()
    measured = script.quality(models.SHIPPED / "ref", models.SHIPPED / "proposal", build_task(cfg))
    recorded = models.shipped_recipe()["p_correct"]
    for model in ("ref", "proposal"):
        for split in ("train", "test"):
            assert measured[model][split] == pytest.approx(recorded[model][split], abs=1e-5)
    # the design point: π_ref right sometimes, the proposal well above it
    assert (
        0.05 < recorded["ref"]["test"] < 0.3
        and recorded["proposal"]["test"] > 2 * recorded["ref"]["test"]
    )


def test_compare_accepts_within_the_tolerance_only(script):
    shipped = {"p_correct": {"ref": {"train": 0.12, "test": 0.11}}}
    close = {"p_correct": {"ref": {"train": 0.12 + script.QUALITY_TOLERANCE * 0.9, "test": 0.11}}}
    far = {"p_correct": {"ref": {"train": 0.12, "test": 0.11 - script.QUALITY_TOLERANCE * 1.1}}}
    assert script.compare(close, shipped).within.all()
    assert script.compare(far, shipped).within.tolist() == [True, False]


@pytest.mark.slow  # pre-trains the shipped recipe: minutes on 2 CPU cores
def test_the_recipe_still_reaches_the_shipped_quality(make_cfg, script, tmp_path):
    """Exact bits are not expected across CPUs (float kernels differ); the quality is."""
    # the test's config, not script.compose_cfg(): Hydra is already initialised by make_cfg
    record = script.pretrain(make_cfg("backbone.source=pretrain"), tmp_path)
    assert record["spec"] == models.shipped_recipe()["spec"]
    table = script.compare(record, models.shipped_recipe())
    assert table.within.all(), table.to_string()
