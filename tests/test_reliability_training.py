"""Faults during training: non-finite samples, gradients and whole runs, bad arguments, resumes (SPEC.md pitfall 9).

The scripts run in this process on one CPU process with tiny random networks (the two-process paths are covered by
tests/test_distill_script.py)."""

import json
import logging
import os

import pytest
import torch
from conftest import load_script, tiny_unet
from diffusers import DDPMPipeline, EDMEulerScheduler
from safetensors.torch import load_file

from diffusers_scm import TrigFlowDenoiser
from diffusers_scm.training import SCMLoss
from diffusers_scm.training.objectives.common import gradient_pass, select_samples


BAD_CLASS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def nan_class_unet(bad_classes=(BAD_CLASS,)):
    """A class-conditional UNet2DModel whose output is NaN for the classes in `bad_classes` only."""
    unet = tiny_unet(sample_size=8, num_class_embeds=10)
    with torch.no_grad():
        for c in bad_classes:
            unet.class_embedding.weight[c] = float("nan")
    return unet


def save_edm_teacher(folder, bad_classes=(BAD_CLASS,)):
    DDPMPipeline(unet=nan_class_unet(bad_classes), scheduler=EDMEulerScheduler(sigma_data=0.5)).save_pretrained(folder)
    return str(folder)


COMMON = [
    "--resolution", "8", "--train_batch_size", "16", "--checkpointing_steps", "2", "--validation_steps", "100",
    "--num_validation_images", "2", "--tangent_warmup_steps", "1", "--report_to", "none",
]  # fmt: skip


def test_select_samples_walks_conditioning():
    keep = torch.tensor([True, False, True])
    cond = {"class_labels": torch.arange(3), "added": {"text_embeds": torch.ones(3, 2)}, "shared": torch.ones(1, 5)}
    out = select_samples(cond, keep)
    assert out["class_labels"].tolist() == [0, 2]
    assert out["added"]["text_embeds"].shape == (2, 2)
    assert out["shared"].shape == (1, 5)


def test_nan_samples_never_reach_the_weight_gradients():
    """A teacher (and a student copied from it) that is NaN for one class: the loss masks those samples and, unlike
    masking after the gradient pass, leaves every weight gradient finite and equal to the finite samples' own."""
    torch.manual_seed(0)
    student = TrigFlowDenoiser(nan_class_unet().train(), "edm", sigma_data=0.5)
    teacher = TrigFlowDenoiser(nan_class_unet(), "edm", sigma_data=0.5)
    labels = torch.tensor([0, BAD_CLASS, 5, BAD_CLASS])
    x0, noise, t = torch.randn(4, 1, 8, 8) * 0.5, torch.randn(4, 1, 8, 8), torch.tensor([0.3, 0.7, 1.0, 1.3])
    loss_fn = SCMLoss(tangent_warmup_steps=0, adaptive_weighting=False)
    loss, logs = loss_fn(student, x0, teacher, t=t, noise=noise, class_labels=labels)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    assert int(logs["nonfinite"]) == 2
    assert torch.isfinite(loss) and torch.isfinite(grads).all()
    # the same gradients as the finite samples alone
    student.zero_grad()
    ok = labels != BAD_CLASS
    ref, _ = loss_fn(student, x0[ok], teacher, t=t[ok], noise=noise[ok], class_labels=labels[ok])
    ref.backward()
    ref_grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grads, ref_grads)


def test_gradient_pass_without_a_finite_sample_returns_none():
    student = TrigFlowDenoiser(tiny_unet(sample_size=8), "edm", sigma_data=0.5)
    x = torch.randn(2, 1, 8, 8)
    assert gradient_pass(student, x, torch.ones(2), torch.zeros(2, dtype=torch.bool), {}) is None
    out = gradient_pass(student, x, torch.ones(2), torch.tensor([False, True]), {})
    assert out[0].abs().max() == 0 and out[1].abs().max() > 0


def test_distill_with_a_nan_class_keeps_the_student_finite_and_counts_it(tmp_path, caplog):
    distill = load_script("distill")
    teacher = save_edm_teacher(tmp_path / "teacher")
    out = tmp_path / "student"
    with caplog.at_level(logging.WARNING):
        distill.main(["--teacher", teacher, "--output_dir", str(out), "--max_train_steps", "3", *COMMON])
    weights = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    trained = {k: v for k, v in weights.items() if not k.startswith("class_embedding")}
    assert all(torch.isfinite(v).all() for v in trained.values()), "non-finite student weights"
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 3 and summary["skipped_steps"] == 0
    assert summary["nonfinite_samples"] > 0
    lines = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert lines[-1]["nonfinite_samples"] == summary["nonfinite_samples"]
    assert sum(line["nonfinite_samples_in_step"] for line in lines) == summary["nonfinite_samples"]
    assert "left out of the gradient pass" in caplog.text


def test_run_with_every_step_skipped_fails_and_saves_nothing(tmp_path):
    distill = load_script("distill")
    teacher = save_edm_teacher(tmp_path / "teacher", bad_classes=range(10))
    out = tmp_path / "student"
    with pytest.raises(RuntimeError, match="Every one of the 2 training steps was skipped"):
        distill.main(["--teacher", teacher, "--output_dir", str(out), "--max_train_steps", "2", *COMMON])
    assert not (out / "model_index.json").exists()


class NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def test_nonfinite_gradient_norm_skips_the_update(tmp_path, caplog):
    """A finite loss with a NaN gradient at step 2: that update is skipped (weights unchanged), counted and logged."""
    from accelerate import Accelerator

    from diffusers_scm.training.machinery.loop import train_loop
    from diffusers_scm.training.machinery.run import prepare_training

    distill = load_script("distill")
    args = distill.parse_args(
        ["--method", "sct", "--student", "unused", "--output_dir", str(tmp_path), "--max_train_steps", "3", *COMMON]
    )
    accelerator = Accelerator(cpu=True)
    model = TrigFlowDenoiser(tiny_unet(sample_size=8).train(), "trigflow", sigma_data=0.5)
    data = [{"pixel_values": torch.randn(1, 8, 8)} for _ in range(64)]
    model, head, optimizer, loader, ema, gen, state = prepare_training(args, accelerator, model, data, "student")
    snapshots = []

    def compute_loss(batch, step):
        snapshots.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
        t = torch.full((batch["pixel_values"].shape[0],), 0.5)
        F = model(batch["pixel_values"], t)
        loss = F.pow(2).mean()
        logs = {"t": t, "loss": F.detach().flatten(1).pow(2).mean(1)}
        return (NaNGradient.apply(loss) if step == 1 else loss), logs

    with caplog.at_level(logging.WARNING):
        steps, counters = train_loop(
            args, accelerator, model, optimizer, loader, ema, state, compute_loss, lambda s: None, "t", (model, head)
        )
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert steps == 3 and counters["skipped_steps"] == 1
    assert torch.isfinite(after).all()
    assert not torch.equal(snapshots[0], snapshots[1])  # step 1 updated
    assert torch.equal(snapshots[1], snapshots[2])  # step 2 (NaN gradient) did not
    assert "Step 2: non-finite gradient norm" in caplog.text
    lines = [json.loads(line) for line in (tmp_path / "loss_log.jsonl").read_text().splitlines()]
    assert [line["skipped_steps"] for line in lines] == [0, 1, 1]


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--max_train_steps", "0"),
        ("--max_train_steps", "-3"),
        ("--resolution", "0"),
        ("--checkpointing_steps", "0"),
        ("--validation_steps", "0"),
        ("--train_batch_size", "0"),
        ("--gradient_accumulation_steps", "0"),
        ("--stage2_train_batch_size", "-1"),
    ],
)
def test_bad_numbers_are_argparse_errors(flag, value, capsys):
    distill = load_script("distill")
    with pytest.raises(SystemExit) as e:
        distill.parse_args(["--teacher", "t", flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: expected a positive integer, got {int(value)}" in capsys.readouterr().err


def test_train_teacher_validates_numbers(capsys):
    train_teacher = load_script("train_teacher")
    with pytest.raises(SystemExit):
        train_teacher.parse_args(["--max_train_steps", "0"])
    assert "argument --max_train_steps: expected a positive integer, got 0" in capsys.readouterr().err


def test_resume_rewrites_loss_log_and_never_overwrites_a_finished_student(tmp_path):
    distill = load_script("distill")
    teacher = save_edm_teacher(tmp_path / "teacher", bad_classes=())
    out = tmp_path / "student"
    args = ["--teacher", teacher, "--output_dir", str(out), *COMMON]
    distill.main(args + ["--max_train_steps", "3"])  # checkpoint-2, loss_log steps 1..3, a saved student
    first = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    saved = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    # resuming the step-2 checkpoint of a 2-step run trains nothing: the finished student is kept
    with pytest.raises(ValueError, match="Nothing to train"):
        distill.main(args + ["--max_train_steps", "2", "--resume_from_checkpoint", str(out / "checkpoint-2")])
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == saved
    # a checkpoint past --max_train_steps
    with pytest.raises(ValueError, match="past --max_train_steps 1"):
        distill.main(args + ["--max_train_steps", "1", "--resume_from_checkpoint", "latest"])
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == saved
    # resumed at step 2 and run to 4: one line per step, step 3 recomputed with the same loss
    distill.main(args + ["--max_train_steps", "4", "--resume_from_checkpoint", str(out / "checkpoint-2")])
    lines = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert lines[2]["loss"] == pytest.approx(first[2]["loss"], rel=1e-6)
    assert os.path.isfile(out / "checkpoint-4" / "training_state.json")
