"""`benchmarks/gpu_check.py --quick`: the GPU check's code at toy sizes on CPU, so that the script cannot rot before its
first GPU run. Every section runs and reports finite numbers, or says why a value cannot be had on CPU."""

import json
import math
import os
import subprocess
import sys

import pytest


SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_check.py")
SECTIONS = ("attention", "jvp_model", "train_step", "sampling", "memory")
# the values that only a GPU has: CUDA peak memory, the Triton kernel, the planner's measured counterpart
CUDA_ONLY = {
    "attention": {"peak_mb"},
    "jvp_model": {"jvp_peak_mb"},
    "train_step": {"diffusion_peak_mb", "scd_peak_mb"},
    "sampling": {"peak_mb"},
    "memory": {"measured_mb", "ratio"},
}
MEASURED = {
    "attention": ("out_rel_err", "tangent_rel_err", "seconds"),
    "jvp_model": ("forward_s", "jvp_s", "ratio"),
    "train_step": ("diffusion_s", "scd_s", "ratio"),
    "sampling": ("seconds_per_image",),
    "memory": ("predicted_mb",),
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--output_dir", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_every_section_runs_and_reports_finite_numbers(report):
    data, _ = report
    assert data["quick"] and data["device"] == "cpu"
    assert list(data["sections"]) == list(SECTIONS)
    for name in SECTIONS:
        section = data["sections"][name]
        assert section["status"] == "ok", (name, section.get("error"))
        assert section["rows"], name
        for row in section["rows"]:
            triton = "triton" in str(row.get("backend", ""))
            for key in MEASURED[name] + tuple(CUDA_ONLY[name]):
                value = row[key]
                if triton or key in CUDA_ONLY[name]:  # no CUDA here: said so, not a number
                    assert value == "n/a: no CUDA", (name, key, row)
                else:
                    assert isinstance(value, float) and math.isfinite(value), (name, key, row)


def test_the_sections_measure_what_they_say(report):
    data, _ = report
    attention = data["sections"]["attention"]["rows"]
    configurations = {(r["attention"], r["mask"], r["dtype"], r["backend"]) for r in attention}
    for kind, masks in (("self", ("none", "padding", "padding_full")), ("cross", ("none", "padding"))):
        for mask in masks:
            for dtype in ("float32", "bfloat16"):
                assert {(kind, mask, dtype, b) for b in ("math", "blocked", "triton")} <= configurations
    for r in attention:  # against float64 on the same rounded inputs: float32 to rounding, bfloat16 to its precision
        if r["backend"] != "triton":
            limit = 1e-5 if r["dtype"] == "float32" else 3e-2
            assert r["out_rel_err"] < limit and r["tangent_rel_err"] < limit, r
    assert {r["family"] for r in data["sections"]["jvp_model"]["rows"]} == {"sd3", "flux", "sana", "wan"}
    sampling = data["sections"]["sampling"]["rows"]
    assert {(r["pipeline"].split()[0], r["steps"]) for r in sampling} == {
        (p, s) for p in ("SCMPipeline", "StableDiffusion3Pipeline") for s in (1, 2)
    }
    memory = data["sections"]["memory"]["rows"]
    assert [r["configuration"] for r in memory] == ["full", "LoRA rank 16", "full, gradient checkpointing"]
    full, lora, checkpointed = (r["predicted_mb"] for r in memory)
    assert lora < full and checkpointed != full


def test_the_markdown_report_has_the_tables(report):
    _, text = report
    for title in ("JVP attention", "One JVP pass", "One sCD training step", "Seconds per image", "Memory planner"):
        assert f"## {title}" in text
    assert text.count("| --- |") >= 5
    assert "| tokens | attention | mask | dtype | backend |" in text
