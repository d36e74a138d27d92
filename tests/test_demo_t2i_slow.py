"""The text-to-image demo end to end (slow): VAE, flow-matching SD3 teacher, sCD and TCM students with guidance,
evaluation on the ten digit prompts against the teacher's own samples, report; asserts the demo's targets and that
degenerate samplers fail them."""

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
    # guided: 2 evaluations per step; 2 NFE: the degenerate check, 8: the yardstick, 64: the reference samples
    assert {r["nfe"] for r in rows if r["model"] == "teacher"} >= {2, 8, 64}
    demo = results["demo"]
    assert demo["reference_nfe"] == 64 and demo["yardstick_nfe"] == 8 and demo["yardstick_fd_to_teacher"] > 0
    targets = demo["targets"]
    # 1-step sCD: FD to the teacher's 64-NFE samples <= 4x the teacher's own at 8 NFE, per-prompt diversity within
    # 0.75x-1.33x the teacher's, prompt accuracy within 3 points of the teacher's; 2 steps: FD <= 3x; >= 16x fewer NFE
    one, two = targets["sCD 1-step"], targets["sCD 2-step"]
    assert one["fd_ratio_to_yardstick"] <= 4.0 and 0.75 <= one["diversity_ratio"] <= 1.33, targets
    assert one["accuracy_gap_points"] <= 3.0 and one["nfe_reduction"] >= 16, targets
    assert two["fd_ratio_to_yardstick"] <= 3.0 and 0.75 <= two["diversity_ratio"] <= 1.33, targets
    assert one["met"] and two["met"] and two["nfe_reduction"] >= 16, targets
    # the target can fail: the teacher's one Euler step and a per-prompt mean image do
    checks = demo["checks"]
    assert set(checks) == {"teacher 1-step (Euler)", "mean teacher image per prompt"}, checks
    assert not any(c["met"] for c in checks.values()), checks
    assert checks["mean teacher image per prompt"]["diversity_ratio"] < 1e-6, checks
