"""The reproduction check (experiments/check_reproduction.py): its intervals, its verdicts, and
the README table printed from the stated figures (docs/figures/headline.json)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

import check_reproduction as cr  # noqa: E402


@pytest.mark.parametrize(
    "df, expected",  # Student's t 0.975 quantiles from printed tables
    [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)],
)
def test_t_quantile_matches_the_printed_tables(df, expected):
    assert cr.t_quantile(df) == pytest.approx(expected, abs=2e-4)


def _sweep(root: Path, values: dict[str, list[float]], **extra) -> Path:
    """A sweep directory of one summary.json per seed holding ``values[key][seed]``."""
    n = len(next(iter(values.values())))
    for seed in range(n):
        run = root / str(seed)
        run.mkdir(parents=True)
        summary = {k: v[seed] for k, v in values.items()} | {"seed": seed} | extra
        (run / "summary.json").write_text(json.dumps(summary))
    return root


@pytest.fixture
def reference(tmp_path):
    """Five seeds: the exact figures equal at every seed, the seeded ones spread."""
    rng = np.random.default_rng(0)
    values = {}
    for key, _, _ in cr.FIGURES:
        base = float(rng.uniform(0.1, 0.9))
        values[key] = [base] * 5 if key in cr.EXACT else (base + rng.normal(0, 0.02, 5)).tolist()
    values["policy.pass_at_16"] = [1.0] * 5  # on its bound at every seed: no measured spread
    return values, _sweep(tmp_path / "ref", values, **{"backbone.ref_fingerprint": "abc"})


def test_intervals_are_exact_tolerance_or_t_sqrt2_se(reference):
    values, sweep = reference
    stated = cr.record(sweep, None, "cmd", None)
    t4 = cr.t_quantile(4)
    for key, f in stated["figures"].items():
        x = np.asarray(values[key], dtype=np.float64)
        se = x.std(ddof=1) / math.sqrt(5)
        assert f["mean"] == pytest.approx(x.mean()) and f["se"] == pytest.approx(se)
        if key in cr.EXACT:
            half = cr.EXACT_TOLERANCE
        else:
            half = max(t4 * math.sqrt(2) * se, cr.EXACT_TOLERANCE)
        assert f["kind"] == ("exact" if key in cr.EXACT else "seeded")
        assert (f["low"], f["high"]) == pytest.approx((x.mean() - half, x.mean() + half))


def test_a_figure_outside_its_interval_fails_the_check(reference, tmp_path, monkeypatch, capsys):
    values, sweep = reference
    headline = tmp_path / "headline.json"
    monkeypatch.setattr(cr, "HEADLINE", headline)
    assert cr.main(["--record", str(sweep)]) == 0
    assert cr.main(["--sweep-dir", str(sweep)]) == 0  # the reference sweep itself: all inside
    assert f"{len(cr.FIGURES)} of {len(cr.FIGURES)} figures inside" in capsys.readouterr().out

    stated = json.loads(headline.read_text())["figures"]
    moved = dict(values)
    f = stated["policy.tv_target"]
    moved["policy.tv_target"] = [f["high"] + 0.01] * 5  # a mean just past the interval
    moved["ref.p_correct_exact"] = [
        v + 0.9 * cr.EXACT_TOLERANCE for v in values["ref.p_correct_exact"]
    ]
    other = _sweep(tmp_path / "here", moved, **{"backbone.ref_fingerprint": "abc"})
    assert cr.main(["--sweep-dir", str(other)]) == 1
    out = capsys.readouterr().out
    assert f"{len(cr.FIGURES) - 1} of {len(cr.FIGURES)} figures inside" in out
    (bad,) = [line for line in out.splitlines() if line.rstrip().endswith("NO")]
    assert "DISA policy: TV to p* (partition R ∪ rest)" in bad


def test_the_readme_table_is_the_stated_figures():
    """The README's embedded-default table is what ``--markdown`` prints from headline.json,
    and that file's means and s.e. are those of its own per-seed values."""
    stated = json.loads(cr.HEADLINE.read_text())
    for f in stated["figures"].values():
        x = np.asarray(f["per_seed"], dtype=np.float64)
        assert f["mean"] == pytest.approx(x.mean()) and f["n"] == len(x) >= 3
        assert f["se"] == pytest.approx(x.std(ddof=1) / math.sqrt(len(x)))
    assert cr.markdown(stated) in (REPO / "README.md").read_text()
