"""Settings resolved once (disa.settings), renamed settings (disa.config), the stage plan."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from disa.config import RENAMED, ConfigError, upgrade_config, upgrade_overrides, validate
from disa.settings import SEED_RANGE, Settings, derive_seed
from disa.stages import PROPOSAL_STAGES, STAGES, plan


# -- derive_seed ---------------------------------------------------------------------------------
def test_derive_seed_is_a_stable_function_of_its_parts_in_range():
    seeds = {
        derive_seed(s, "rollout", step, rank)
        for s in range(3)
        for step in range(50)
        for rank in range(4)
    }
    assert len(seeds) == 3 * 50 * 4  # no two streams collide (here)
    assert all(0 <= x < SEED_RANGE for x in seeds)
    assert derive_seed(7, "sample", "ref", 3) == derive_seed(7, "sample", "ref", 3)
    # the combination an affine formula with a final % 2**31 folded together: rank · 2**40
    assert derive_seed(0, "rollout", 0, 0) != derive_seed(0, "rollout", 0, 1)
    assert derive_seed(0, "rollout", 0, 2**40) != derive_seed(0, "rollout", 0, 0)
    # parts are typed: the shard "1" is another stream than the shard 1
    assert derive_seed(0, "sample", 1) != derive_seed(0, "sample", "1")


# -- Settings ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "components", "lam", "lam_eff"),
    [
        ((), ("ref", "proposal"), 0.5, 0.5),
        (
            ("proposal.strength=0.3", "proposal.num_samples=32"),
            ("ref", "proposal"),
            0.3,
            10 / 32,
        ),  # round(9.6) = 10
        (("proposal=ref",), ("ref",), 0.0, 0.0),
        (("proposal=model",), ("proposal",), 1.0, 1.0),
    ],
)
def test_settings_derive_components_and_the_realised_strength(
    make_cfg, overrides, components, lam, lam_eff
):
    cfg = make_cfg(*overrides)
    validate(cfg)
    s = Settings.from_config(cfg)
    assert (s.components, s.strength, s.strength_effective) == (components, lam, lam_eff)
    assert s.beta == float(cfg.beta) and s.num_samples == int(cfg.proposal.num_samples)
    with pytest.raises(AttributeError):  # frozen: nothing downstream changes a setting
        s.beta = 1.0


def test_settings_hold_the_loss_options_and_whether_training_loads_the_reference(make_cfg):
    disa = Settings.from_config(make_cfg("beta=3"))
    # DISA reads log π_ref from the cache
    assert disa.loss_options.beta == 3.0 and not disa.loads_reference
    assert Settings.from_config(make_cfg("algorithm=flowrl")).loads_reference
    assert not Settings.from_config(make_cfg("algorithm=grpo")).loads_reference
    assert Settings.from_config(
        make_cfg("algorithm=grpo", "algorithm.loss_args.kl_coef=0.05")
    ).loads_reference


def test_dr_grpo_norm_len_is_the_samplers_max_new_tokens_unless_set(make_cfg):
    mode = "algorithm.loss_args.loss_agg_mode=seq-mean-token-sum-norm"
    # sampler=hf default
    assert Settings.from_config(make_cfg("algorithm=grpo", mode)).loss_options.norm_len == 8
    assert (
        Settings.from_config(
            make_cfg("algorithm=grpo", mode, "sampler.max_new_tokens=24")
        ).loss_options.norm_len
        == 24
    )
    assert (
        Settings.from_config(
            make_cfg("algorithm=grpo", mode, "+algorithm.loss_args.norm_len=5")
        ).loss_options.norm_len
        == 5
    )
    assert Settings.from_config(make_cfg("algorithm=lora_sft")).loss_options.norm_len == 8


def test_fixed_strength_of_ref_and_model_is_not_silently_replaced(make_cfg):
    with pytest.raises(
        ConfigError,
        match=r"proposal.strength=0.3 with proposal.kind='ref' is invalid; allowed: 0.0",
    ):
        validate(make_cfg("proposal=ref", "proposal.strength=0.3"))
    with pytest.raises(ConfigError, match=r"proposal.kind='model' is invalid; allowed: 1.0"):
        validate(make_cfg("proposal=model", "proposal.strength=0.5"))


def test_unknown_loss_args_are_refused_naming_the_allowed_ones(make_cfg):
    with pytest.raises(ConfigError, match=r"loss_args has \['clip'\].*allowed: \['clip_eps'"):
        validate(make_cfg("algorithm=grpo", "+algorithm.loss_args.clip=0.2"))


# -- renamed settings ----------------------------------------------------------------------------
def test_old_spellings_on_the_command_line_are_rewritten_with_a_warning():
    with pytest.warns(FutureWarning, match="train.chunk_size is now scoring.chunk_size"):
        args = upgrade_overrides(
            [
                "beta=2",
                "train.chunk_size=64",
                "+sampler.score_batch_size=8",
                "~train.checkpoint_every",
            ]
        )
    assert args == [
        "beta=2",
        "scoring.chunk_size=64",
        "+scoring.batch_size=8",
        "~checkpoint.every_n_steps",
    ]
    assert upgrade_overrides(["trainer.max_steps=3", "train.x=1"]) == [
        "trainer.max_steps=3",
        "train.x=1",
    ]


def test_old_spellings_in_a_config_file_are_moved_with_a_warning(make_cfg):
    cfg = make_cfg()
    OmegaConf.set_struct(cfg, False)
    cfg.train = {"checkpoint_every": 7, "gradient_checkpointing": True}
    cfg.sampler.score_batch_size = 16
    with pytest.warns(FutureWarning):
        cfg = upgrade_config(cfg)
    assert "train" not in cfg and "score_batch_size" not in cfg.sampler
    assert (cfg.checkpoint.every_n_steps, cfg.checkpoint.activations, cfg.scoring.batch_size) == (
        7,
        True,
        16,
    )
    validate(cfg)


def test_every_new_spelling_exists_in_the_config(make_cfg):
    cfg = make_cfg()
    for new in RENAMED.values():
        assert OmegaConf.select(cfg, new, default="<absent>") != "<absent>", new


# -- the plan ------------------------------------------------------------------------------------
def _names(stages):
    return [s.name for s in stages]


def test_plan_of_a_full_offline_job_is_every_stage_in_order():
    assert _names(plan("all", online=False, enumerable=True)) == [
        "oracle",
        "sample",
        "score",
        "anchor",
        "train",
        "evaluate",
    ]
    assert _names(plan("all", online=False)) == ["sample", "score", "anchor", "train", "evaluate"]


def test_plan_of_an_online_job_skips_the_proposal_stages_unless_asked():
    assert _names(plan("all", online=True, enumerable=True)) == ["oracle", "train", "evaluate"]
    assert _names(plan("score", online=True)) == ["sample", "score"]


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        ("sample", ["sample"]),
        ("score", ["sample", "score"]),
        ("anchor", ["oracle", "sample", "score", "anchor"]),
        ("train", ["oracle", "sample", "score", "anchor", "train"]),
    ],
)
def test_plan_stops_at_the_stage_asked_for(stage, expected):
    assert _names(plan(stage, online=False, enumerable=True)) == expected


def test_plan_with_a_study_and_on_a_follower_rank():
    assert _names(plan("all", online=False, study=True, enumerable=True)) == [
        "oracle",
        "sample",
        "score",
        "anchor",
        "study",
    ]
    assert _names(plan("anchor", online=False, study=True)) == [
        "sample",
        "score",
        "anchor",
        "study",
    ]
    assert _names(plan("all", online=False, study=True, study_stops=False))[-3:] == [
        "study",
        "train",
        "evaluate",
    ]
    assert _names(plan("all", online=False, leader=False)) == ["sample", "score", "anchor", "train"]


def test_stage_inputs_are_outputs_of_earlier_stages():
    seen = set()
    for stage in STAGES:
        assert set(stage.inputs) <= seen, stage.name
        seen.add(stage.output)
    assert set(PROPOSAL_STAGES) <= {s.name for s in STAGES}
