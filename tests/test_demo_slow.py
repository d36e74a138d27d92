"""The README's demo end to end from the installed package: teacher, TCM student with the score regularization,
evaluation, report (slow)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_meets_its_targets(tmp_path):
    out = tmp_path / "report"
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--output_dir", str(out), "--cache_dir", str(tmp_path)],
        check=True,
        timeout=3600,
    )
    results = json.loads((out / "results.json").read_text())
    for name in ("results.md", "samples.png", "fd_vs_nfe.png", "grids/student-1step.png", "grids/student-2step.png"):
        assert (out / name).is_file(), name
    rows = results["rows"]
    assert {r["steps"] for r in rows if r["model"] == "student"} == {1, 2}
    assert max(r["nfe"] for r in rows if r["model"] == "teacher") >= 32
    targets = results["demo"]["targets"]
    # student 1-step FD-digits <= 1.5x the teacher's best, 2-step <= 1.10x, at >= 16x fewer network evaluations
    assert targets["1-step"]["fd_ratio_to_teacher_best"] <= 1.5, targets
    assert targets["2-step"]["fd_ratio_to_teacher_best"] <= 1.10, targets
    assert all(t["met"] and t["limit"] == {"1-step": 1.5, "2-step": 1.10}[name] for name, t in targets.items()), (
        targets
    )
    assert all(t["nfe_reduction"] >= 16 and t["teacher_nfe"] is not None for t in targets.values()), targets
    assert results["classifier_accuracy"] >= 0.95
