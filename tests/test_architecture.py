"""The import rules of docs/ARCHITECTURE.md, checked on the source (every import, including
the ones inside functions): each unit of the package imports only the units below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: unit → the units it may import. A unit is a module or package directly under disa/.
ALLOWED: dict[str, set[str]] = {
    # foundations: pure math and infrastructure, importing nothing of the harness
    "anchor": set(),
    "losses": set(),
    "cache": set(),
    "tokenization": set(),
    "scoring": set(),
    "sandbox": set(),
    "tracking": set(),
    "executors": set(),
    "settings": {"anchor", "losses"},
    # components
    "analysis": {"anchor"},
    "studies": {"anchor"},
    "evaluation": {"anchor"},
    "oracle": {"scoring", "tokenization"},
    "judge": {"tokenization"},
    "tasks": {"sandbox", "tokenization"},
    "sampling": {"settings", "tokenization", "scoring"},
    "models": {"cache", "scoring", "tokenization"},
    "config": {"executors", "losses", "models", "scoring", "tasks"},
    "training": {"cache", "losses", "models", "sampling", "scoring", "settings", "tokenization"},
    # the stage layer, and the job that runs it
    "stages": {
        "anchor",
        "cache",
        "evaluation",
        "executors",
        "judge",
        "models",
        "oracle",
        "sampling",
        "scoring",
        "settings",
        "studies",
        "tasks",
        "tokenization",
        "training",
    },
    "job": {"cache", "config", "executors", "models", "settings", "stages", "tasks", "tracking"},
}
#: third-party packages that only some units may import: the trainer stays in training/
ONLY_IN = {"lightning": {"training"}}


def _unit(path: Path) -> str:
    rel = path.relative_to(REPO / "disa")
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """Top-level names imported anywhere in ``path``: ``disa.<unit>`` or a third-party root."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = (
                [node.module] if node.module != "disa" else [f"disa.{a.name}" for a in node.names]
            )
        else:
            continue
        for name in names:
            parts = name.split(".")
            out.add(".".join(parts[:2]) if parts[0] == "disa" else parts[0])
    return out


def _sources() -> list[Path]:
    return [
        p
        for p in sorted((REPO / "disa").rglob("*.py"))
        if p.name != "__init__.py" or p.parent.name != "disa"
    ]


def test_every_unit_imports_only_what_the_rules_allow():
    wrong = []
    units = set()
    for path in _sources():
        unit = _unit(path)
        units.add(unit)
        assert unit in ALLOWED, (
            f"{path.relative_to(REPO)}: unit {unit!r} has no rule in ALLOWED (and docs/ARCHITECTURE.md)"
        )
        for name in _imports(path):
            if name.startswith("disa."):
                other = name.removeprefix("disa.")
                if other in ALLOWED and other != unit and other not in ALLOWED[unit]:
                    wrong.append(f"{path.relative_to(REPO)} imports disa.{other}")
            elif name in ONLY_IN and unit not in ONLY_IN[name]:
                wrong.append(
                    f"{path.relative_to(REPO)} imports {name} (allowed only in {sorted(ONLY_IN[name])})"
                )
    assert not wrong, "import rules broken:\n" + "\n".join(wrong)
    assert units == set(ALLOWED), (
        f"rules for units that no longer exist: {sorted(set(ALLOWED) - units)}"
    )


def test_the_rules_are_layers_without_cycles():
    """No unit can reach itself: nothing calls back up into the module above it."""

    def reach(unit: str, seen: tuple[str, ...]) -> None:
        for other in ALLOWED[unit]:
            assert other not in seen, f"cycle: {' → '.join((*seen, other))}"
            reach(other, (*seen, other))

    for unit in ALLOWED:
        reach(unit, (unit,))


@pytest.mark.parametrize("rule", ["run.py imports only the job and the config"])
def test_the_entry_point_reads_like_the_data_flow(rule):
    names = {n for n in _imports(REPO / "run.py") if n.startswith("disa")}
    assert names <= {"disa.job", "disa.config"}, names


def test_the_architecture_document_lists_every_unit():
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = [u for u in ALLOWED if f"`{u}" not in text]
    assert not missing, f"docs/ARCHITECTURE.md does not describe {missing}"
