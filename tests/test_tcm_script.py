"""End to end: `examples/distill.py --method tcm` (two processes on CPU with gloo) and `--method cd`, with a tiny random
teacher; the Stage-2 student is a loadable SCMPipeline whose scheduler knows the dividing time."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from test_distill_script import SCRIPT, _launch, _losses

from diffusers_scm import SCMPipeline
from diffusers_scm.training import load_teacher


T_DIV = math.atan(1.0 / 0.5)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from conftest import tiny_unet

    path = tmp_path_factory.mktemp("teacher") / "ddpm"
    DDPMPipeline(unet=tiny_unet(sample_size=16), scheduler=DDPMScheduler()).save_pretrained(path)
    return str(path)


COMMON = [
    "--dataset_name",
    "digits",
    "--resolution",
    "16",
    "--train_batch_size",
    "8",
    "--checkpointing_steps",
    "2",
    "--validation_steps",
    "2",
    "--num_validation_images",
    "4",
    "--learning_rate",
    "1e-3",
    "--report_to",
    "none",
]


def _max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def test_two_process_tcm_both_stages_and_loading(teacher_dir, tmp_path):
    out = str(tmp_path / "tcm")
    args = ["--method", "tcm", "--teacher", teacher_dir, "--max_train_steps", "2", "--stage2_max_train_steps", "3"]
    _launch(args + COMMON + ["--tangent_warmup_steps", "2", "--output_dir", out])

    # Stage 1 (sCD by default with a teacher) is kept as a loadable pipeline
    stage1_dir = os.path.join(out, "stage1")
    assert json.load(open(os.path.join(stage1_dir, "training_summary.json")))["steps"] == 2
    assert sorted(_losses(stage1_dir)) == [1, 2]
    stage1 = SCMPipeline.from_pretrained(stage1_dir)
    assert stage1.scheduler.config.dividing_timestep is None
    # Stage 2 (continuous objective by default after sCD): two replicas in sync, its own checkpoints and samples
    summary = json.load(open(os.path.join(out, "training_summary.json")))
    assert summary["num_processes"] == 2 and summary["steps"] == 3 and summary["replicas_in_sync"]
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-2"]
    assert os.path.isfile(os.path.join(out, "samples", "step-0000002-2step.png"))
    assert json.load(open(os.path.join(out, "training_args.json")))["tcm_objective"] == "continuous"

    pipe = SCMPipeline.from_pretrained(out)
    config = pipe.scheduler.config
    assert config.dividing_timestep == pytest.approx(T_DIV) and config.intermediate_timesteps >= T_DIV
    assert config.parameterization == "vp_epsilon"
    assert _max_diff(pipe.unet, stage1.unet) > 1e-6  # Stage 2 trained away from its Stage-1 start
    assert _max_diff(stage1.unet, load_teacher(teacher_dir).inner_model) > 1e-6
    pipe.set_progress_bar_config(disable=True)
    for steps in (1, 2):
        images = pipe(
            batch_size=2, num_inference_steps=steps, output_type="np", generator=torch.Generator().manual_seed(0)
        ).images
        assert images.shape == (2, 16, 16, 1) and images.min() >= 0 and images.max() <= 1
    assert pipe.scheduler.timesteps.tolist() == pytest.approx([math.atan(160.0), T_DIV], abs=1e-6)


def _run(args):
    """One process without the launcher (faster)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]


def test_single_process_cd_and_stage2_only_with_resume(teacher_dir, tmp_path):
    common = COMMON + ["--validation_steps", "100"]
    # discrete consistency distillation as a method of its own
    cd = str(tmp_path / "cd")
    _run(["--method", "cd", "--teacher", teacher_dir, "--max_train_steps", "2", *common, "--output_dir", cd])
    assert json.load(open(os.path.join(cd, "training_summary.json")))["steps"] == 2
    assert SCMPipeline.from_pretrained(cd).scheduler.config.dividing_timestep is None

    # Stage 2 only, from the CD model, discrete objective without a teacher (truncated CT); resumable
    out = str(tmp_path / "stage2")
    args = ["--method", "tcm", "--stage1_model", cd, "--tcm_objective", "discrete", "--stage2_max_train_steps", "4"]
    _run(args + common + ["--output_dir", out])
    assert not os.path.exists(os.path.join(out, "stage1"))
    pipe = SCMPipeline.from_pretrained(out)
    assert pipe.scheduler.config.dividing_timestep == pytest.approx(T_DIV)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert images.images.shape == (2, 16, 16, 1)

    resumed = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(out, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    _run(args + common + ["--output_dir", resumed, "--resume_from_checkpoint", "latest"])
    full, again = _losses(out), _losses(resumed)
    assert sorted(again) == [3, 4]
    for step in (3, 4):
        assert abs(again[step] - full[step]) <= 1e-6 * max(1.0, abs(full[step])), (step, again[step], full[step])


def _distill_module():
    spec = importlib.util.spec_from_file_location("distill", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_clear_errors_and_defaults(capsys):
    distill = _distill_module()
    for argv, message in (
        (["--method", "tcm"], "--method tcm needs --teacher, --student (to start Stage 1) or --stage1_model"),
        (["--method", "tcm", "--tcm_stage1_method", "cd"], "needs --teacher; or give --stage1_model"),
        (["--method", "cd"], "--method cd needs --teacher"),
        (["--method", "scd", "--teacher", "x", "--stage1_model", "y"], "--stage1_model is for --method tcm"),
    ):
        with pytest.raises(SystemExit):
            distill.parse_args(argv)
        assert message in capsys.readouterr().err, argv
    args = distill.parse_args(["--method", "tcm", "--teacher", "x"])
    assert (args.tcm_stage1_method, args.tcm_objective) == ("scd", "continuous")
    args = distill.parse_args(["--method", "tcm", "--teacher", "x", "--tcm_stage1_method", "ct"])
    assert args.tcm_objective == "discrete"
    args = distill.parse_args(["--method", "tcm", "--stage1_model", "y"])  # Stage 2 only: truncated sCT
    assert args.tcm_stage1_method == "sct" and args.tcm_objective == "continuous"


def test_stage2_logs_after_stage1_in_the_trackers(teacher_dir, tmp_path, monkeypatch):
    """Both stages log to the same trackers: Stage 2's steps follow Stage 1's instead of overwriting them; the per-stage
    loss_log.jsonl files keep their own step counts."""
    import accelerate

    logged = []
    monkeypatch.setattr(accelerate.Accelerator, "log", lambda self, values, step=None, **kw: logged.append(step))
    spec = importlib.util.spec_from_file_location("distill_for_log_steps", SCRIPT)
    distill = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(distill)
    out = str(tmp_path / "tcm")
    args = ["--method", "tcm", "--teacher", teacher_dir, "--max_train_steps", "2", "--stage2_max_train_steps", "3"]
    distill.main(args + COMMON + ["--tangent_warmup_steps", "1", "--validation_steps", "100", "--output_dir", out])
    assert logged == [1, 2, 3, 4, 5]
    assert sorted(_losses(os.path.join(out, "stage1"))) == [1, 2] and sorted(_losses(out)) == [1, 2, 3]
