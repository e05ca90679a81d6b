"""Sweeps: a real multirun with offline W&B runs, every experiment config (composed and run
with debug=fast), the launcher configs, W&B tracking and the W&B report builder.

The tiny sweep and the bias-variance study run are built once per session (also used by
tests/test_notebooks.py) on one shared artifact cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

# Real multiruns and every experiment run end to end take minutes of CPU: those tests are
# marked slow (`pytest -m slow`); config composition, tracking and the report stay fast.

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
SWEEP_NAME = "tinysweep"
#: debug=fast drops the W&B logger; these put it back, offline
WANDB = [
    "+logger.wandb._target_=lightning.pytorch.loggers.WandbLogger",
    "+logger.wandb.project=disa-test",
    "+logger.wandb.mode=offline",
    "+logger.wandb.tags=[${algorithm.name},${task.name}]",
]

_built: dict[str, Path] = {}


def shared_cache(tmp_path_factory) -> Path:
    if "cache" not in _built:
        _built["cache"] = tmp_path_factory.mktemp("shared") / "cache"
    return _built["cache"]


def run_py(cwd: Path, *args: str, wandb_mode: str = "offline") -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "WANDB_MODE": wandb_mode,
        "TQDM_DISABLE": "1",
        "HYDRA_FULL_ERROR": "1",
        "WANDB_SILENT": "true",
    }
    proc = run_cli(*args, cwd=cwd, env=env)
    if proc.returncode != 0:
        raise AssertionError(
            f"run.py {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def tiny_sweep(tmp_path_factory) -> Path:
    """``run.py -m debug=fast beta=1,2 seed=0,1`` with offline W&B runs: 4 jobs."""
    if "sweep" not in _built:
        root = tmp_path_factory.mktemp("multirun")
        run_py(
            root,
            "-m",
            "debug=fast",
            "beta=1,2",
            "seed=0,1",
            f"cache_dir={shared_cache(tmp_path_factory)}",
            f"hydra.sweep.dir={root / SWEEP_NAME}",
            *WANDB,
        )
        _built["sweep"] = root / SWEEP_NAME
    return _built["sweep"]


def tiny_baselines(tmp_path_factory) -> Path:
    """``run.py -m debug=fast algorithm=disa,flowrl seed=0,1``: DISA's anchor and FlowRL's
    logged log Z_φ on the same prompts, per-prompt metrics for the paired comparison."""
    if "baselines" not in _built:
        root = tmp_path_factory.mktemp("baselines")
        run_py(
            root,
            "-m",
            "debug=fast",
            "algorithm=disa,flowrl",
            "seed=0,1",
            "logger=csv",
            f"cache_dir={shared_cache(tmp_path_factory)}",
            f"hydra.sweep.dir={root / 'sweep'}",
        )
        _built["baselines"] = root / "sweep"
    return _built["baselines"]


def tiny_k_sweep(tmp_path_factory) -> Path:
    """``experiment=k_convergence`` shrunk: K = 4, 8 × seeds 0, 1 × both evaluation splits."""
    if "k" not in _built:
        root = tmp_path_factory.mktemp("k")
        run_py(
            root,
            "-m",
            "experiment=k_convergence",
            "debug=fast",
            "proposal.num_samples=4,8",
            "seed=0,1",
            "logger=csv",
            f"cache_dir={shared_cache(tmp_path_factory)}",
            f"hydra.sweep.dir={root / 'sweep'}",
        )
        _built["k"] = root / "sweep"
    return _built["k"]


def compose_cfg(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def run_in_process(tmp_path_factory, name: str, *overrides: str) -> tuple[Path, dict]:
    from disa.job import run

    cfg = compose_cfg(*overrides, "debug=fast", f"cache_dir={shared_cache(tmp_path_factory)}")
    run_dir = tmp_path_factory.mktemp(name)
    return run_dir, run(cfg, run_dir)


def study_run(tmp_path_factory) -> Path:
    """``experiment=anchor_bias_variance debug=fast``: K_max = 8 per component."""
    if "study" not in _built:
        _built["study"], _ = run_in_process(
            tmp_path_factory, "study", "experiment=anchor_bias_variance"
        )
    return _built["study"]


# -- a real multirun ----------------------------------------------------------------------
def _wandb_runs(job_dir: Path) -> list[Path]:
    return sorted((job_dir / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_multirun_gives_each_job_its_dir_and_wandb_run(tmp_path_factory):
    sweep = tiny_sweep(tmp_path_factory)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    summaries = [json.loads((j / "summary.json").read_text()) for j in jobs]
    assert {(s["beta"], s["seed"]) for s in summaries} == {(1.0, 0), (1.0, 1), (2.0, 0), (2.0, 1)}
    # β does not change the rollouts: one sample artifact per seed, reused by the other β
    assert len({s["artifact.sample.ref"] for s in summaries}) == 2
    run_ids = set()
    for job, s in zip(jobs, summaries):
        (run,) = _wandb_runs(job)  # exactly one W&B run per job
        run_ids.add(run.name.rsplit("-", 1)[1])
        record = next(run.glob("*.wandb")).read_bytes()
        assert f"{SWEEP_NAME}/{job.name}".encode() in record  # the run's name: <group>/<job num>
        # group: the sweep dir's name
        assert re.search(rb"(?<![/\w])" + SWEEP_NAME.encode() + rb"(?![/\w])", record)
        for key in (
            "artifact.anchor",
            "artifact.score",
            "artifact.sample.ref",
            "artifact.sample.proposal",
        ):
            label = key.removeprefix("artifact.").replace(".", "-")
            assert f"{label}-{s[key]}".encode() in record, key
        (table,) = run.glob("files/media/table/eval_samples_*.table.json")
        data = json.loads(table.read_text())
        assert data["columns"][:4] == ["model", "prompt_id", "sample_idx", "text"]
        assert 0 < len(data["data"]) <= 48 and {r[0] for r in data["data"]} == {"ref", "policy"}
    assert len(run_ids) == 4


def test_wandb_disabled_or_absent_is_skipped(tmp_path, monkeypatch):
    from disa import tracking

    cfg = compose_cfg("logger=default", f"cache_dir={tmp_path}")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert [type(lg).__name__ for lg in tracking.build_loggers(cfg, tmp_path)] == ["CSVLogger"]
    assert tracking.build_loggers(compose_cfg("logger=none"), tmp_path) == []
    # an experiment's `logger.wandb.group` without the logger itself (logger=none) is no logger
    assert (
        tracking.build_loggers(compose_cfg("logger=none", "experiment=baselines"), tmp_path) == []
    )
    monkeypatch.setenv("WANDB_MODE", "offline")
    lcfg = cfg.logger.wandb
    assert tracking.wandb_enabled(lcfg)
    settings = tracking.wandb_run_settings(
        cfg, OmegaConf.merge(lcfg, {"job_type": None}), tmp_path / "run7"
    )
    assert settings == {"name": "run7", "group": None, "job_type": "all"}  # no multirun: no group


def test_sample_table_rows(tmp_path):
    from disa import tracking

    for model in ("ref", "policy"):
        pd.DataFrame(
            {
                "prompt_id": [f"p{i}" for i in range(20) for _ in range(5)],
                "sample_idx": list(range(5)) * 20,
                "text": "1+2",
                "reward": 1.0,
                "n_tokens": 4,
            }
        ).to_parquet(tmp_path / f"eval_samples_{model}.parquet")
    columns, rows = tracking.sample_rows(tmp_path)
    assert columns == ["model", "prompt_id", "sample_idx", "text", "reward", "n_tokens"]
    per_model = tracking.TABLE_PROMPTS * tracking.TABLE_SAMPLES_PER_PROMPT
    assert len(rows) == 2 * per_model and all(
        r[2] < tracking.TABLE_SAMPLES_PER_PROMPT for r in rows
    )


# -- experiment configs ----------------------------------------------------------------------
def _commented(path: Path) -> list[str]:
    """Lines of a YAML file that set a value without a comment."""
    bad = []
    for line in path.read_text().splitlines():
        body = line.split("#", 1)[0].rstrip()
        if re.match(r"^\s*(- )?[\w./@]+:\s*\S", body) and "#" not in line:
            bad.append(line)
    return bad


def _embedded(name: str) -> bool:
    """Whether an experiment runs on the embedded backbone (others need model files)."""
    return compose_cfg(f"experiment={name}").backbone.kind == "embedded"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name):
    path = REPO / "conf" / "experiment" / f"{name}.yaml"
    assert path.read_text().startswith("# @package _global_")
    assert _commented(path) == []
    from disa.config import validate

    cfg = compose_cfg(f"experiment={name}", hydra=True)
    if cfg.backbone.kind == "embedded":  # the others name model paths that only exist elsewhere
        validate(cfg)
    params = cfg.hydra.sweeper.params or {}
    if name == "sensitivity_beta":
        assert params["beta"] == "1,2,4,8"
    if name == "sensitivity_proposal":
        assert params["proposal.strength"] == "0,0.25,0.5,0.75,1" and cfg.proposal.kind == "mixture"
    if name == "anchor_bias_variance":
        assert (
            cfg.study.stop and cfg.study.name == "bias_variance" and cfg.proposal.num_samples == 512
        )
    if name == "k_convergence":
        assert (
            params["proposal.num_samples"] == "8,32,128,512"
            and params["eval.split"] == "train,test"
        )
        # the sweep dir
        assert cfg.algorithm.name == "disa" and "_k_convergence_" in path.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_with_debug_fast(tmp_path_factory, name):
    if not _embedded(name):
        pytest.skip(f"experiment={name} needs a real backbone (its own tests cover it)")
    if name == "anchor_bias_variance":
        run_dir = study_run(tmp_path_factory)
        summary = json.loads((run_dir / "summary.json").read_text())
        # the study ends the job
        assert "artifact.anchor" in summary and "artifact.train" not in summary
        assert (
            "policy.mean_at_k" not in summary
            and not (run_dir / "eval_samples_ref.parquet").exists()
        )
        assert summary["study.rows"] > 0 and "time.study_s" in summary
        table = pd.read_parquet(run_dir / "bias_variance.parquet")
        agg = pd.read_parquet(run_dir / "bias_variance_agg.parquet")
        assert {"log_z_hat", "log_z", "se", "bias_delta", "ess", "replicate"} <= set(table.columns)
        assert {"bias", "var", "mse", "pred_bias", "pred_var", "coverage"} <= set(agg.columns)
        assert set(agg.K) == {2, 4}  # K_max = 8 per component: K = 8 would have one replicate
        assert len(table) == summary["study.rows"]
    else:
        _, summary = run_in_process(tmp_path_factory, name, f"experiment={name}")
        assert summary["train.steps"] == 5 and "policy.mean_at_k" in summary


@pytest.mark.slow
def test_study_needs_valid_settings(tmp_path_factory):
    with pytest.raises(ValueError, match=r"study\.beta=\[-1\.0\]"):
        run_in_process(
            tmp_path_factory, "bad", "experiment=anchor_bias_variance", "study.beta=[-1.0]"
        )


# -- launchers ------------------------------------------------------------------------------
def test_launchers_compose():
    for launcher, target in (("joblib", "JoblibLauncher"), ("slurm", "SlurmLauncher")):
        cfg = compose_cfg(f"hydra/launcher={launcher}", hydra=True)
        assert cfg.hydra.launcher._target_.endswith(target)
        raw = OmegaConf.to_container(cfg.hydra, resolve=False)  # job dirs resolve only inside a job
        assert raw["sweep"]["subdir"] == "${hydra.job.num}"  # one directory per job, always
    slurm = OmegaConf.to_container(
        compose_cfg(
            "hydra/launcher=slurm", "hydra.launcher.partition=gpu", hydra=True
        ).hydra.launcher,
        resolve=False,
    )
    assert slurm["partition"] == "gpu" and slurm["submitit_folder"].startswith("${hydra.sweep.dir}")
    for path in (REPO / "conf" / "hydra" / "launcher").glob("*.yaml"):
        assert _commented(path) == [], path


@pytest.mark.slow
def test_joblib_multirun_runs_jobs_in_parallel(tmp_path_factory):
    root = tmp_path_factory.mktemp("joblib")
    run_py(
        root,
        "-m",
        "hydra/launcher=joblib",
        "debug=fast",
        "beta=1,2",
        f"cache_dir={shared_cache(tmp_path_factory)}",
        wandb_mode="disabled",
    )
    # the default sweep dir, with its unique suffix
    (multirun,) = root.glob("multirun/*/*/multirun.yaml")
    assert sorted(
        json.loads(p.read_text())["beta"] for p in multirun.parent.glob("*/summary.json")
    ) == [1.0, 2.0]


# -- the W&B report builder ------------------------------------------------------------------
def _report_module():
    spec = importlib.util.spec_from_file_location(
        "wandb_report", REPO / "experiments" / "wandb_report.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_wandb_report_builds_offline(capsys):
    pytest.importorskip("wandb_workspaces")
    mod = _report_module()
    spec = mod.report_spec("disa", group="baselines", entity="me", pass_k=(1, 4))
    report = mod.build_report(spec)
    grid = report.blocks[-1]
    assert type(grid).__name__ == "PanelGrid" and len(grid.panels) == len(spec["panels"])
    assert grid.runsets[0].filters and "baselines" in str(grid.runsets[0].filters)
    kinds = [type(p).__name__ for p in grid.panels]
    assert kinds.count("BarPlot") == 5 and "LinePlot" in kinds
    pass_panel = next(p for p in spec["panels"] if p["title"] == "pass@k")
    assert pass_panel["metrics"] == ["policy.pass_at_1", "policy.pass_at_4"]
    assert type(mod.build_workspace(spec)).__name__ == "Workspace"
    assert mod.main(["--group", "baselines", "--dry-run"]) == 0
    out = capsys.readouterr().out
    printed = json.loads(out[: out.rindex("}") + 1])
    assert printed["group"] == "baselines" and "not saved" in out
