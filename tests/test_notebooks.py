"""Each notebook (jupytext source) executes end to end (nbclient) on a tiny sweep made here,
and saves its figures into the sweep directory."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from test_sweeps import study_run, tiny_baselines, tiny_k_sweep, tiny_sweep

pytest.importorskip("jupytext")
pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[1]
#: notebook → (the run or sweep it reads, the PNGs it must write there)
NOTEBOOKS = {
    "bias_variance": (
        study_run,
        [
            "bias_variance_vs_K.png",
            "bias_variance_vs_beta_lambda.png",
            "bias_variance_theory_fit.png",
        ],
    ),
    "baselines": (
        tiny_baselines,
        ["comparison.png", "pass_at_k.png", "training_curves.png", "log_z_calibration.png"],
    ),
    "sensitivity": (tiny_sweep, ["sensitivity_beta.png"]),
    "k_convergence": (tiny_k_sweep, ["k_convergence.png"]),
}


def _build_module():
    spec = importlib.util.spec_from_file_location("notebook_build", REPO / "notebooks" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sources_have_a_parameters_cell():
    import jupytext

    build = _build_module()
    assert sorted(build.NOTEBOOKS) == sorted(NOTEBOOKS)
    for name in NOTEBOOKS:
        nb = jupytext.read(REPO / "notebooks" / f"{name}.py")
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        # $DISA_SWEEP_DIR
        assert len(tagged) == 1 and "analysis.sweep_dirs_from_env()" in tagged[0].source


@pytest.mark.slow  # builds a sweep and executes every notebook on it: minutes of CPU
@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_executes(tmp_path_factory, monkeypatch, name):
    make, pngs = NOTEBOOKS[name]
    target = make(tmp_path_factory)
    monkeypatch.setenv("DISA_SWEEP_DIR", str(target))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    out = _build_module().build(
        name, tmp_path_factory.mktemp("nb"), execute=True, timeout=300, cwd=REPO
    )
    import nbformat

    nb = nbformat.read(out, as_version=4)
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.output_type == "error"
    ]
    assert errors == []
    # figures shown
    assert any(
        o.output_type == "display_data" and "image/png" in o.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )
    for png in pngs:
        assert (target / png).stat().st_size > 1000, png
