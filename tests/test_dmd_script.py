"""`distill.py --dmd_weight`: the score regularizer in a two-process run (replicas in sync, the fake-score network and
its optimizer in the checkpoints, exact resumption) and its clear errors."""

import json
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file
from test_distill_script import SCRIPT, _launch, _losses, short_run_args, teacher_dir  # noqa: F401

from diffusers_scm import SCMPipeline


def test_two_process_dmd_regularized_distillation_resumes_exactly(teacher_dir, tmp_path):  # noqa: F811
    out = str(tmp_path / "student")
    common = short_run_args(teacher_dir) + ["--dmd_weight", "0.5", "--dmd_fake_updates", "2", "--dmd_start_step", "1"]
    common += ["--dmd_sample_steps", "2", "--dmd_step_weights", "3", "1"]
    _launch(common + ["--output_dir", out])
    summary = json.load(open(os.path.join(out, "training_summary.json")))
    assert summary["steps"] == 4 and summary["replicas_in_sync"]
    checkpoint = os.path.join(out, "checkpoint-4")
    assert {"fake_score.safetensors", "optimizer_fake_score.pt"} <= set(os.listdir(checkpoint))
    # the fake-score network trained away from its start, the teacher's weights
    fake = load_file(os.path.join(checkpoint, "fake_score.safetensors"))
    start = load_file(os.path.join(out, "checkpoint-2", "fake_score.safetensors"))
    assert max((fake[k] - start[k]).abs().max().item() for k in fake) > 1e-6
    optimizer = torch.load(os.path.join(checkpoint, "optimizer_fake_score.pt"), weights_only=True)
    assert len(optimizer["state"]) > 0

    # without the term the same run gives another student
    plain = str(tmp_path / "plain")
    _launch(short_run_args(teacher_dir) + ["--output_dir", plain])
    a, b = SCMPipeline.from_pretrained(out).unet, SCMPipeline.from_pretrained(plain).unet
    assert max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters())) > 1e-6

    # resuming from checkpoint-2 (fake-score weights and Adam state restored) reproduces steps 3 and 4
    resumed = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(out, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    _launch(common + ["--output_dir", resumed, "--resume_from_checkpoint", "latest"])
    full, again = _losses(out), _losses(resumed)
    for step in (3, 4):
        assert abs(again[step] - full[step]) <= 1e-6 * max(1.0, abs(full[step])), (step, again[step], full[step])


def test_dmd_weight_errors_name_the_fix(teacher_dir, tmp_path):  # noqa: F811
    for extra, message in (
        (["--method", "cd"], "--dmd_weight regularizes a continuous-time student"),
        (["--method", "scd", "--lora_rank", "4"], "drop --lora_rank / --fsdp, or --dmd_weight"),
        (["--method", "scd", "--dmd_weight", "-1"], "--dmd_weight must not be negative"),
        (["--dmd_sample_steps", "2", "--dmd_step_weights", "1"], "give 2 non-negative frequencies"),
    ):
        weight = [] if "--dmd_weight" in extra else ["--dmd_weight", "1"]
        res = subprocess.run(
            [sys.executable, SCRIPT, "--teacher", teacher_dir, *weight, *extra, "--output_dir", str(tmp_path / "x")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode != 0 and message in res.stderr, res.stderr[-2000:]
