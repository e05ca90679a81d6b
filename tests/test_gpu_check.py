"""The GPU acceptance script (experiments/gpu_check.py): its bookkeeping, and its CPU dry run
(``--device cpu --tiny``, slow), which must pass before the script ever meets a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

import gpu_check  # noqa: E402


def test_a_failing_section_is_recorded_and_the_next_ones_still_run(tmp_path):
    args = gpu_check.parse_args(
        ["--device", "cpu", "--tiny", "--out", str(tmp_path), "--sections", "env,disa,fused"]
    )
    check = gpu_check.Check(args)

    def broken():
        raise RuntimeError("disa exited 1:\nTraceback ...\nValueError: boom")

    check.section("env", gpu_check.env_section, args)
    check.section("disa", broken)
    check.section("fused", lambda: gpu_check.Skipped("no CUDA here"))
    check.section("benchmark", lambda: pytest.fail("not among --sections: must not run"))
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = result["sections"]
    assert list(sections) == ["env", "disa", "fused"]
    assert sections["env"]["status"] == "ok" and sections["env"]["figures"]["versions"]["torch"]
    assert sections["disa"] == {
        "status": "failed",
        "error": "RuntimeError: disa exited 1:\nTraceback ...\nValueError: boom",
        "seconds": sections["disa"]["seconds"],
    }
    assert (
        sections["fused"]["status"] == "skipped" and sections["fused"]["figures"] == "no CUDA here"
    )
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| disa | failed |" in md and "ValueError: boom |" in md and "| fused | skipped |" in md
    assert "Traceback" in (tmp_path / "gpu_check.log").read_text()


def test_unknown_sections_are_refused_with_the_allowed_ones():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--sections", "env,vllm"])


@pytest.mark.slow
def test_cpu_dry_run_passes_every_section(tmp_path):
    """What `python experiments/gpu_check.py --device cpu --tiny` does (a few minutes on 2 cores)."""
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "experiments" / "gpu_check.py"),
            "--device",
            "cpu",
            "--tiny",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert {n: s["status"] for n, s in sections.items()} == {
        "env": "ok",
        "backbone": "ok",
        "disa": "ok",
        "grpo": "ok",
        "fused": "skipped",
        "fsdp2": "ok",
        "benchmark": "ok",
        "pytest": "ok",
    }
    assert (
        sections["disa"]["figures"]["train.steps"] == 3
        and sections["fsdp2"]["figures"]["train.steps"] == 2
    )
    # the FSDP2 run trained from the rollouts, scores and anchor that the DISA run cached
    assert all(sections["fsdp2"]["figures"][f"reused.{s}"] for s in ("sample", "score", "anchor"))
    assert sections["grpo"]["figures"]["train.tokens_generated"] > 0
    assert "runs Triton kernels on a CUDA device" in sections["fused"]["figures"]
    bench = sections["benchmark"]["figures"]
    assert {r["method"] for r in bench["steps"]} == {"disa", "sft_chunked", "sft_hf", "naive"}
    assert set(bench["meta"]["fused_skipped"]) == {"liger", "cce"}
    assert sections["pytest"]["figures"]["counts"] == {"skipped": 5}
    md = (tmp_path / "gpu_check.md").read_text()
    assert "training step (one optimizer step" in md and "| disa | ok |" in md
