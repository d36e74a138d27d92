"""FSDP2 on CPU: torch's `fully_shard` over gloo in 2 processes. accelerate enables FSDP only with GPUs; the package
reads the sharding from the parameters, so these runs exercise the code that an `accelerate launch --use_fsdp
--fsdp_version 2` run goes through (sharded JVP, EMA, checkpoints, gathering for sampling and saving)."""

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from test_distill_script import _free_port, _launch, _losses, short_run_args, teacher_dir  # noqa: F401 (a fixture)


WORKER = os.path.join(os.path.dirname(__file__), "fsdp_worker.py")


def test_sharded_student_jvp_ema_checkpoint_equal_unsharded(tmp_path):
    families = ["unet", "sd15_unet", "sd3", "flux", "sana", "wan"]
    result = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        cmd + [WORKER, str(result), str(tmp_path / "ckpt"), *families], capture_output=True, text=True, env=env
    )
    assert res.returncode == 0, res.stderr[-5000:]
    main, other = json.loads(result.read_text())
    for name in families:
        r = main[name]
        assert r["sharded"] and r["blocks"], name
        # the JVP of the sharded student (all-gathered weights inside the forward-mode pass) equals the unsharded one
        for backend in ("math", "blocked"):
            assert max(r[f"jvp_{backend}"]) < 1e-6, (name, backend, r[f"jvp_{backend}"])
        assert r["ema_shadow_is_sharded"], name  # no full copy is kept between steps
        assert r["ema_max_abs"] < 1e-6 and r["copy_max_abs"] == 0.0, name  # gathered EMA == unsharded EMA
        assert other[name]["others_get_none"]  # only the main process holds the gathered network
        for key in ("reload_weights", "reload_moments", "reload_ema"):  # sharded checkpoint round trip
            assert r[key] == 0.0 and other[name][key] == 0.0, (name, key)


def test_accelerate_fsdp2_preparation_equals_fully_shard(tmp_path):
    """accelerate's own FSDP2 `prepare` (auto-wrap from the student's blocks, optimizer remapped) of the scripts'
    `prepare_training`, switched on in a CPU run, against `--fsdp`: same units, same losses, same EMA."""
    result = tmp_path / "result.json"
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    worker = os.path.join(os.path.dirname(__file__), "fsdp_accelerate_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd + [worker, str(result), "flux"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-5000:]
    r = json.loads(result.read_text())
    assert r["accelerate"]["by_accelerate"] and not r["fsdp"]["by_accelerate"]
    assert r["accelerate"]["units"] == r["fsdp"]["units"]
    assert {"FSDPFluxTransformerBlock", "FSDPFluxSingleTransformerBlock", "FSDPLogVarHead"} <= set(r["fsdp"]["units"])
    assert r["accelerate"]["losses"] == pytest.approx(r["fsdp"]["losses"], rel=1e-6, abs=1e-9)
    assert r["ema_max_abs"] < 1e-6


def _weights(folder):
    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


def test_fsdp_distillation_equals_ddp_and_resumes(teacher_dir, tmp_path):  # noqa: F811
    # Adam's first steps move every weight by +-lr whatever the size of its gradient; a larger epsilon keeps the
    # summation-order noise of near-zero gradients (DDP all-reduce vs FSDP reduce-scatter) out of the comparison
    common = short_run_args(teacher_dir) + ["--adam_epsilon", "1e-2"]
    ddp, fsdp = str(tmp_path / "ddp"), str(tmp_path / "fsdp")
    _launch(common + ["--output_dir", ddp])
    _launch(common + ["--output_dir", fsdp, "--fsdp", "--fsdp_shard_teacher"])  # the teacher sharded too

    losses_ddp, losses_fsdp = _losses(ddp), _losses(fsdp)
    assert sorted(losses_fsdp) == [1, 2, 3, 4]
    for step, loss in losses_ddp.items():
        assert abs(losses_fsdp[step] - loss) <= 1e-5 * max(1.0, abs(loss)), (step, loss, losses_fsdp[step])
    summary = json.load(open(os.path.join(fsdp, "training_summary.json")))
    assert summary["sharded"] and summary["num_processes"] == 2
    # sharded checkpoints: every process wrote its shards, no full copy
    checkpoint = os.path.join(fsdp, "checkpoint-4")
    assert sorted(os.listdir(os.path.join(checkpoint, "sharded_state"))) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    assert not os.path.exists(os.path.join(checkpoint, "student.safetensors"))
    # the final EMA network, gathered into safetensors on the main process, equals the DDP run's
    final_ddp, final_fsdp = _weights(ddp), _weights(fsdp)
    assert final_ddp.keys() == final_fsdp.keys()
    assert max((final_ddp[k] - final_fsdp[k]).abs().max().item() for k in final_ddp) < 1e-5

    # resume the sharded run from step 2: the same losses and the same final weights
    shutil.rmtree(os.path.join(fsdp, "checkpoint-4"))
    _launch(common + ["--output_dir", fsdp, "--fsdp", "--fsdp_shard_teacher", "--resume_from_checkpoint", "latest"])
    resumed = _losses(fsdp)
    assert resumed == losses_fsdp
    final_resumed = _weights(fsdp)
    assert max((final_resumed[k] - final_fsdp[k]).abs().max().item() for k in final_fsdp) == 0.0

    # a sharded checkpoint resumed without --fsdp: a clear error, and nothing on disk changes
    res = subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(__file__), "..", "examples", "distill.py"), *common]
        + ["--output_dir", fsdp, "--resume_from_checkpoint", "latest", "--max_train_steps", "6"],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "written by a sharded (FSDP) run" in res.stderr, res.stderr[-3000:]


def test_fsdp_clear_errors(teacher_dir, tmp_path):  # noqa: F811
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "distill.py")
    base = [sys.executable, script, "--teacher", teacher_dir, "--max_train_steps", "1", "--report_to", "none"]
    res = subprocess.run(base + ["--output_dir", str(tmp_path / "a"), "--fsdp"], capture_output=True, text=True)
    assert res.returncode != 0 and "start the script with `accelerate launch --num_processes N`" in res.stderr


def test_fsdp_refuses_lora_students(tmp_path):
    from accelerate import Accelerator
    from conftest import tiny_cond_unet

    from diffusers_scm import TrigFlowDenoiser
    from diffusers_scm.training.machinery.lora import add_lora
    from diffusers_scm.training.machinery.run import _use_fsdp

    args = argparse.Namespace(fsdp=True, gradient_accumulation_steps=1)
    network = tiny_cond_unet()
    add_lora(network, 4)
    with pytest.raises(ValueError, match="--fsdp with a LoRA student is not supported"):
        _use_fsdp(args, Accelerator(cpu=True), TrigFlowDenoiser(network, "vp_epsilon"))
