"""Runs as a whole: resuming with changed flags, one run per output folder, the end of every script, the replica check
with non-finite weights (issue 24, cases 4, 6, 7 and 8).

The scripts run in this process on one CPU process with tiny random networks, except one two-process launch (gloo)
that is refused at its start. The hang at exit (case 7: a gloo group destroyed from DDP's Reducer at module teardown,
about one run in ten to thirty) cannot be reproduced in a test; what is checked is the order that rules it out: the
reducers go first, then the process group, in the one shutdown helper that every script ends through."""

import ast
import json
import logging
import os
import socket
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from conftest import load_script, tiny_unet
from diffusers import DDPMPipeline, DDPMScheduler

from diffusers_scm import TrigFlowDenoiser


LOCK_NAME = "training.lock"  # in --output_dir while a run holds it
ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = [
    "--resolution", "8", "--train_batch_size", "8", "--checkpointing_steps", "2", "--validation_steps", "100",
    "--num_validation_images", "2", "--tangent_warmup_steps", "1", "--report_to", "none",
]  # fmt: skip


def save_teacher(folder, **unet_kwargs):
    DDPMPipeline(unet=tiny_unet(sample_size=8, **unet_kwargs), scheduler=DDPMScheduler()).save_pretrained(folder)
    return str(folder)


# ---------------------------------------------------------------------------------------------------------------------
# 4. Resuming with changed flags names the flag and both values, and never calls the checkpoint corrupted


def _settings_error(call) -> str:
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "corrupted" not in message and "Delete" not in message, message
    return message


def test_resume_with_another_lora_rank_or_without_lora_names_the_flag(tmp_path):
    """The record of `run_config` in `training_state.json` is compared before any tensor is read."""
    from accelerate import Accelerator
    from conftest import tiny_cond_unet

    from diffusers_scm.training.machinery.checkpointing import load_checkpoint, save_checkpoint
    from diffusers_scm.training.machinery.lora import add_lora
    from diffusers_scm.training.machinery.run import run_config

    accelerator = Accelerator(cpu=True)

    def student_and_settings(rank):
        network = tiny_cond_unet()
        if rank is not None:
            add_lora(network, rank)
        student = TrigFlowDenoiser(network.train(), "edm", sigma_data=0.5)
        flags = Namespace(method="scd", resolution=8, lora_rank=rank, lora_alpha=None, lora_target_modules=None)
        optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad])
        return student, optimizer, run_config(flags, student)

    student, optimizer, settings = student_and_settings(4)
    assert settings["--lora_rank"] == 4 and settings["network"]["class"] == "UNet2DConditionModel"
    folder = save_checkpoint(accelerator, str(tmp_path), 2, {"student": student}, optimizer, run_config=settings)

    def resume(rank):
        student, optimizer, settings = student_and_settings(rank)
        return lambda: load_checkpoint(accelerator, folder, {"student": student}, optimizer, run_config=settings)

    assert _settings_error(resume(8)) == (
        f"Checkpoint {folder} was written with --lora_rank 4; this run has --lora_rank 8: resume with the flags it "
        "was written with, or start a new --output_dir."
    )
    assert "was written with --lora_rank 4; this run has no --lora_rank: " in _settings_error(resume(None))
    assert resume(4)() == 2  # the same flags


def test_resume_with_another_teacher_names_it_and_a_mismatch_is_not_called_corrupted(tmp_path):
    distill = load_script("distill")
    teacher = save_teacher(tmp_path / "teacher")
    out = tmp_path / "student"
    args = ["--output_dir", str(out), *COMMON]
    distill.main(["--teacher", teacher, *args, "--max_train_steps", "2"])  # checkpoint-2
    checkpoint = out / "checkpoint-2"
    resume = ["--max_train_steps", "3", "--resume_from_checkpoint", "latest"]

    def refused(teacher_dir, *extra) -> str:
        message = _settings_error(lambda: distill.main(["--teacher", teacher_dir, *args, *extra, *resume]))
        assert not (out / LOCK_NAME).exists()  # released after the error
        return message

    # another teacher (and so another student network): named, with the config entries that differ
    other = save_teacher(tmp_path / "other_teacher", num_class_embeds=10)
    message = refused(other)
    assert message.startswith(f"Checkpoint {checkpoint} was written for a UNet2DModel(num_class_embeds=None); ")
    assert "this run trains a UNet2DModel(num_class_embeds=10) (from --teacher)" in message
    assert "it was written with the teacher UNet2DModel(num_class_embeds=None); this run's --teacher is a " in message
    assert f"it was written with --teacher {teacher}; this run has --teacher {other}: resume with the" in message

    # a checkpoint written before the record: its tensors do not fit, which points to changed settings
    state_file = checkpoint / "training_state.json"
    state = json.loads(state_file.read_text())
    assert state["run_config"]["--teacher"] == teacher and state["modules"] == ["logvar_head", "student"]
    del state["run_config"]
    state_file.write_text(json.dumps(state))
    message = refused(other)
    assert message.startswith(f"Checkpoint {checkpoint} does not fit this run: loading the student weights failed")
    assert 'Missing key(s) in state_dict: "inner_model.class_embedding.weight"' in message

    # a module the checkpoint lacks (the fake-score network of --dmd_weight)
    assert refused(teacher, "--dmd_weight", "0.5") == (
        f"Checkpoint {checkpoint} holds no state of ['fake_score', 'optimizer_fake_score'], which this run trains "
        "(added by --dmd_weight): it was written with other settings; resume with the flags it was written with, or "
        "start a new --output_dir."
    )

    # the same teacher resumes
    distill.main(["--teacher", teacher, *args, *resume])
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 3
    assert not (out / LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------------------------------------
# 6. One run per output folder: a live holder's lock refuses a second run; a dead one's is taken over


def _write_lock(folder: Path, pid: int):
    from diffusers_scm.training.machinery.output_lock import _process_start

    folder.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "hostname": socket.gethostname(), "started": "then", "process_start": _process_start(pid)}
    (folder / LOCK_NAME).write_text(json.dumps(record))
    return record


def test_output_dir_lock_refuses_a_live_run_and_takes_over_a_stale_one(tmp_path, caplog):
    from diffusers_scm.training.machinery.output_lock import OutputDirLockedError
    from diffusers_scm.training.machinery.run import training_run

    train_vae = load_script("train_vae")
    out = tmp_path / "vae"
    args = train_vae.parse_args(["--output_dir", str(out), "--report_to", "none"])
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        record = _write_lock(out, holder.pid)
        with pytest.raises(OutputDirLockedError) as info:
            train_vae.main(["--output_dir", str(out), "--report_to", "none"])
        message = str(info.value)
        assert f"process {holder.pid} on {socket.gethostname()}, started then holds {out / LOCK_NAME}" in message
        assert f"kill {holder.pid}" in message and "another --output_dir" in message
        assert json.loads((out / LOCK_NAME).read_text()) == record  # left to its holder
        assert not (out / "training_args.json").exists()  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale, taken over for the run and released at its end
    with caplog.at_level(logging.WARNING):
        with training_run(args, "vae"):
            mine = json.loads((out / LOCK_NAME).read_text())
            assert mine["pid"] == os.getpid() and mine["hostname"] == socket.gethostname()
    assert f"its process {holder.pid} has ended" in caplog.text
    assert not (out / LOCK_NAME).exists()


def test_two_process_run_into_a_locked_output_dir_is_refused_on_every_process(tmp_path):
    """`accelerate launch` with two processes (gloo): the main process finds the lock, and both processes stop with
    the holder's process id (none goes on to train, none waits for the other)."""
    out = tmp_path / "student"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        _write_lock(out, holder.pid)
        teacher = save_teacher(tmp_path / "teacher")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
        cmd = [accelerate, "launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        cmd += ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(port)]
        cmd += [str(ROOT / "examples" / "distill.py"), "--teacher", teacher, "--output_dir", str(out), *COMMON]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    finally:
        holder.kill()
        holder.wait()
    assert res.returncode != 0
    for rank in (0, 1):  # each process raised the refusal itself (none was stopped by the other's failure)
        error = f"[rank{rank}]: diffusers_scm.training.machinery.output_lock.OutputDirLockedError: {out} is in use by another "
        assert f"{error}training run: process {holder.pid} on" in res.stderr, res.stderr[-3000:]
    assert not (out / "training_args.json").exists()


# ---------------------------------------------------------------------------------------------------------------------
# 7. Every script ends the same way: DDP's reducers, then the process group, before module teardown


def test_end_run_drops_ddp_reducers_before_destroying_the_process_group(tmp_path, monkeypatch):
    import weakref

    import torch.distributed as dist

    from diffusers_scm.training.machinery.run import end_run, training_run

    train_vae = load_script("train_vae")
    args = train_vae.parse_args(["--output_dir", str(tmp_path / "run"), "--report_to", "none"])
    destroy = dist.destroy_process_group
    reducer_alive_at_destroy = []

    def recording_destroy(*a, **k):
        reducer_alive_at_destroy.append(reducer() is not None)
        return destroy(*a, **k)

    monkeypatch.setattr(dist, "destroy_process_group", recording_destroy)
    try:
        with training_run(args, "vae") as accelerator:
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
            ddp = torch.nn.parallel.DistributedDataParallel(tiny_unet().train())
            ddp(torch.randn(2, 1, 8, 8), torch.tensor([10, 20])).sample.sum().backward()
            reducer = weakref.ref(ddp.reducer)
            end_run(accelerator)
            assert not dist.is_initialized()
            assert reducer_alive_at_destroy == [False]  # the Reducer went first, while the group was alive
            end_run(accelerator)  # again at the end of `training_run`: nothing left to do
    finally:
        if dist.is_initialized():
            destroy()
    assert reducer_alive_at_destroy == [False]


def test_every_script_ends_through_training_run():
    """Each example script that makes an accelerator does it in `main` with `training_run` (which ends through
    `end_run`), and none ends training or makes an accelerator by itself."""
    scripts = []
    for path in sorted((ROOT / "examples").glob("*.py")):
        source = path.read_text()
        if "Accelerator(" in source or "make_accelerator" in source or "training_run" in source:
            scripts.append(path.name)
            tree = ast.parse(source)
            main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
            withs = [n for n in ast.walk(main) if isinstance(n, ast.With)]
            assert any(ast.unparse(item.context_expr).startswith("training_run(") for w in withs for item in w.items)
            assert ".end_training(" not in source and "make_accelerator(" not in source, path.name
    assert {"distill.py", "train_teacher.py", "train_vae.py"} <= set(scripts)


# ---------------------------------------------------------------------------------------------------------------------
# 8. The replica check with non-finite weights: NaN checksums agree, and the tensors that are not finite are named


def test_replica_check_names_nonfinite_weights_instead_of_a_difference(caplog):
    from accelerate import Accelerator

    from diffusers_scm.training.machinery.publishing import replica_check

    unet = tiny_unet(num_class_embeds=10)
    with torch.no_grad():
        unet.class_embedding.weight[3] = float("nan")  # a teacher's NaN class, copied into the student
        unet.conv_out.bias[0] = float("inf")
    with caplog.at_level(logging.WARNING):
        result = replica_check(Accelerator(cpu=True), TrigFlowDenoiser(unet, "edm", sigma_data=0.5))
    assert result["replicas_in_sync"] is True
    assert result["nonfinite_weights"] == ["class_embedding.weight", "conv_out.bias"]
    assert "differ" not in caplog.text
    count = len(list(unet.parameters()))
    expected = f"2 of {count} weight tensors hold NaN or infinite values after training: class_embedding.weight, "
    assert expected + "conv_out.bias." in caplog.text
    # finite weights: in sync, nothing named
    result = replica_check(Accelerator(cpu=True), TrigFlowDenoiser(tiny_unet(), "edm", sigma_data=0.5))
    assert result["replicas_in_sync"] is True and "nonfinite_weights" not in result
