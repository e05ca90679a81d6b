"""Turn the jupytext sources of this folder into notebooks, optionally executed.

    python notebooks/build.py                                   # every notebook → notebooks/*.ipynb
    python notebooks/build.py bias_variance --execute           # run it (nbclient), outputs kept
    DISA_SWEEP_DIR=multirun/2026-01-01/12-00-00_x python notebooks/build.py sensitivity --execute --out-dir /tmp/nb

Each source is a percent-format script (``# %%`` cells) with a ``parameters`` cell that
reads ``$DISA_SWEEP_DIR``, so it also runs as a plain script (``python notebooks/baselines.py``)
or opens as a notebook where jupytext is installed. Executed notebooks run with the
repository root as working directory. Needs the ``notebooks`` extra (jupytext, nbclient,
nbformat, ipykernel).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOTEBOOKS = ("bias_variance", "baselines", "sensitivity", "k_convergence")


def build(
    name: str,
    out_dir: str | Path = HERE,
    execute: bool = False,
    timeout: int = 600,
    cwd: str | Path = HERE.parent,
) -> Path:
    """Write ``<out_dir>/<name>.ipynb`` from ``notebooks/<name>.py`` (executed in ``cwd`` if
    ``execute``); return its path. A failing cell raises ``nbclient``'s CellExecutionError."""
    import jupytext
    import nbformat

    nb = jupytext.read(HERE / f"{name}.py")
    if execute:
        from nbclient import NotebookClient

        NotebookClient(
            nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
        ).execute()
    out = Path(out_dir) / f"{name}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "names", nargs="*", default=list(NOTEBOOKS), help=f"notebooks (default: {list(NOTEBOOKS)})"
    )
    ap.add_argument("--execute", action="store_true", help="run every cell (nbclient)")
    ap.add_argument("--out-dir", default=str(HERE), help="where the .ipynb files go")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = ap.parse_args(argv)
    for name in args.names:
        print(build(name, args.out_dir, args.execute, args.timeout))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
