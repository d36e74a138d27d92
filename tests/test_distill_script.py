"""End to end: `accelerate launch examples/distill.py` on CPU (two processes, gloo) with a tiny random teacher."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import warnings

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from diffusers_scm import SCMPipeline
from diffusers_scm.training import load_teacher


LAUNCH_TIMEOUT = int(os.environ.get("DIFFUSERS_SCM_TEST_LAUNCH_TIMEOUT", "180"))
SCRIPT = os.path.join(os.path.dirname(__file__), "..", "examples", "distill.py")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from conftest import tiny_unet

    path = tmp_path_factory.mktemp("teacher") / "ddpm"
    DDPMPipeline(unet=tiny_unet(sample_size=16), scheduler=DDPMScheduler()).save_pretrained(path)
    return str(path)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(args, processes=2):
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [accelerate, "launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if processes > 1:  # a free rendezvous port, so a busy default port cannot stall the launch
        cmd += ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", str(_free_port())]
    else:
        cmd += ["--num_processes", "1"]
    res = _run_with_stacks(cmd + [SCRIPT, *args])
    if res is None:  # stalled (seen once on a shared CI machine, never reproduced): report, then one fresh try
        stalled = _run_with_stacks.last_stderr
        warnings.warn(f"the launch did not finish in {LAUNCH_TIMEOUT} s and was run again; stacks:\n{stalled}")
        if "--output_dir" in args:
            shutil.rmtree(args[args.index("--output_dir") + 1], ignore_errors=True)
        if processes > 1:
            cmd[cmd.index("--main_process_port") + 1] = str(_free_port())
        res = _run_with_stacks(cmd + [SCRIPT, *args])
        if res is None:
            pytest.fail(
                f"the launch did not finish in {LAUNCH_TIMEOUT} s, twice; stacks:\n{stalled}\n---\n"
                f"{_run_with_stacks.last_stderr}"
            )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


def _run_with_stacks(cmd):
    """Run `cmd`; None if it does not finish in LAUNCH_TIMEOUT s, after each of its processes has printed its Python
    stack (PYTHONFAULTHANDLER, then SIGABRT) into `_run_with_stacks.last_stderr`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT)
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    except subprocess.TimeoutExpired:
        pass
    for pid in reversed(_descendants(proc.pid)):  # the workers first, then the launcher
        _signal(pid, signal.SIGABRT)
    try:
        stdout, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *_descendants(proc.pid)]:
            _signal(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    _run_with_stacks.last_stderr = stderr[-20000:]
    return None


def _descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively (from /proc; empty where there is no /proc)."""
    children = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal(pid: int, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _losses(folder):
    with open(os.path.join(folder, "loss_log.jsonl")) as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f)}


def _rates(folder):
    with open(os.path.join(folder, "loss_log.jsonl")) as f:
        return {row["step"]: row["lr"] for row in map(json.loads, f)}


def short_run_args(teacher_dir) -> list[str]:
    """A 4-step sCD run on the 16x16 digits with checkpoints and validation every 2 steps and a cosine schedule."""
    run = "--max_train_steps 4 --checkpointing_steps 2 --validation_steps 2 --num_validation_images 4"
    optimization = "--train_batch_size 8 --tangent_warmup_steps 2 --learning_rate 1e-3 --lr_scheduler cosine"
    data = "--dataset_name digits --resolution 16 --lr_warmup_steps 1 --report_to none"
    return ["--teacher", teacher_dir, *f"{run} {optimization} {data}".split()]


def test_two_process_distillation_resume_and_loading(teacher_dir, tmp_path):
    out = str(tmp_path / "student")
    common = short_run_args(teacher_dir)
    _launch(common + ["--output_dir", out])

    summary = json.load(open(os.path.join(out, "training_summary.json")))
    assert summary["num_processes"] == 2 and summary["steps"] == 4
    assert summary["replicas_in_sync"] and summary["replica_checksums"][0] == summary["replica_checksums"][1]
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]
    assert os.path.isfile(os.path.join(out, "samples", "step-0000002-2step.png"))

    # the student moved away from the teacher
    teacher = load_teacher(teacher_dir)
    pipe = SCMPipeline.from_pretrained(out)
    assert pipe.scheduler.config.parameterization == "vp_epsilon"
    diff = max((a - b).abs().max().item() for a, b in zip(pipe.unet.parameters(), teacher.inner_model.parameters()))
    assert diff > 1e-5
    pipe.set_progress_bar_config(disable=True)
    for steps in (1, 2):
        images = pipe(
            batch_size=2, num_inference_steps=steps, output_type="np", generator=torch.Generator().manual_seed(0)
        ).images
        assert images.shape == (2, 16, 16, 1) and images.min() >= 0 and images.max() <= 1

    # resuming from checkpoint-2 reproduces the uninterrupted losses of steps 3 and 4
    resumed = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(out, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    _launch(common + ["--output_dir", resumed, "--resume_from_checkpoint", "latest"])
    full, again = _losses(out), _losses(resumed)
    assert sorted(again) == [3, 4]
    # the learning-rate schedule (cosine after one warmup step) continues too: lr of update k (k = 1..4)
    expected = [0.0] + [1e-3 * 0.5 * (1 + math.cos(math.pi * (k - 1) / 3)) for k in (1, 2, 3)]
    assert [_rates(out)[k] for k in (1, 2, 3, 4)] == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert [_rates(resumed)[k] for k in (3, 4)] == pytest.approx(expected[2:], rel=1e-6)
    for step in (3, 4):
        assert abs(again[step] - full[step]) <= 1e-6 * max(1.0, abs(full[step])), (step, again[step], full[step])


def test_sct_single_process_and_clear_errors(teacher_dir, tmp_path):
    out = str(tmp_path / "sct")
    _launch(
        [
            "--method",
            "sct",
            "--student",
            teacher_dir,
            "--max_train_steps",
            "2",
            "--train_batch_size",
            "4",
            "--checkpointing_steps",
            "100",
            "--validation_steps",
            "100",
            "--report_to",
            "none",
            "--tangent_norm_c",
            "none",
            "--no_adaptive_weighting",
            "--output_dir",
            out,
        ],
        processes=1,
    )
    assert json.load(open(os.path.join(out, "training_summary.json")))["steps"] == 2
    res = subprocess.run([sys.executable, SCRIPT, "--method", "scd"], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "--method scd needs --teacher" in res.stderr
    bad = tmp_path / "not_a_model"
    bad.mkdir()
    (bad / "notes.txt").write_text("hello")
    res = subprocess.run(
        [sys.executable, SCRIPT, "--teacher", str(bad), "--output_dir", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0 and "neither a diffusers pipeline folder" in res.stderr


def test_train_teacher_then_distill_it(tmp_path):
    teacher_script = os.path.join(os.path.dirname(__file__), "..", "examples", "train_teacher.py")
    teacher = str(tmp_path / "teacher")
    common = [
        "--train_batch_size",
        "8",
        "--checkpointing_steps",
        "2",
        "--validation_steps",
        "2",
        "--num_validation_images",
        "4",
        "--report_to",
        "none",
    ]
    res = subprocess.run(
        [
            sys.executable,
            teacher_script,
            "--preset",
            "tiny",
            "--class_conditional",
            "--max_train_steps",
            "4",
            "--output_dir",
            teacher,
            *common,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    loaded = load_teacher(teacher)
    assert loaded.parameterization.name == "trigflow" and type(loaded.inner_model).__name__ == "SCMUNet2DModel"
    assert os.path.isfile(os.path.join(teacher, "samples", "step-0000004-8step.png"))
    student = str(tmp_path / "student")
    res = subprocess.run(
        [sys.executable, SCRIPT, "--teacher", teacher, "--max_train_steps", "2", "--output_dir", student, *common]
        + ["--intermediate_timestep", "0.9"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    pipe = SCMPipeline.from_pretrained(student)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        batch_size=2,
        num_inference_steps=2,
        class_labels=[3, 7],
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (2, 16, 16, 1)
    pipe.scheduler.set_timesteps(2)  # the two-step middle time given to distill.py
    assert abs(float(pipe.scheduler.timesteps[1]) - 0.9) < 1e-6
