"""The text-to-image demo end to end (slow): VAE, flow-matching SD3 teacher, sCD and TCM students with guidance,
evaluation on the ten digit prompts, report; asserts the demo's targets."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_t2i_meets_its_targets(tmp_path):
    out = tmp_path / "report"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "demo_t2i.py"),
            "--output_dir",
            str(out),
            "--cache_dir",
            str(tmp_path),
        ],
        check=True,
        timeout=3600,
    )
    results = json.loads((out / "results.json").read_text())
    for name in ("results.md", "samples.png", "fd_vs_nfe.png", "grids/sCD-1step.png", "grids/TCM-2step.png"):
        assert (out / name).is_file(), name
    rows = results["rows"]
    assert {r["nfe"] for r in rows if r["model"] == "teacher"} >= {8, 64}  # guided: 2 evaluations per step
    targets = results["demo"]["targets"]
    # 1-step sCD: FD-digits <= 1.5x the teacher's best, prompt accuracy within 3 points of the guided teacher's;
    # 2 steps: <= 1.15x; each at >= 16x fewer network evaluations than the teacher's best
    one = targets["sCD 1-step"]
    assert one["fd_ratio_to_teacher_best"] <= 1.5 and one["accuracy_gap_points"] <= 3.0, targets
    assert targets["sCD 2-step"]["fd_ratio_to_teacher_best"] <= 1.15, targets
    assert targets["sCD 1-step"]["met"] and targets["sCD 2-step"]["met"], targets
