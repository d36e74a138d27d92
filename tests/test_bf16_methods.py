"""`distill.py --mixed_precision bf16` on CPU for every method (sCD, sCT, CD, CT, TCM both stages), with the score
regularizer, with a LoRA student and with FSDP: a few steps each, finite losses, the precision recorded, and the
saved student loads and samples finite images. In-process runs where possible (one accelerate state per run)."""

import json
import math
import os

import pytest
import torch
from conftest import load_script, tiny_unet
from test_distill_script import _launch, teacher_dir  # noqa: F401 (teacher_dir is a fixture)

from diffusers_scm import SCMPipeline, TrigFlowDenoiser
from diffusers_scm.training import ConsistencyLoss, SCMLoss
from diffusers_scm.training.objectives.objective import OBJECTIVES


pytestmark = pytest.mark.usefixtures("one_thread")

RUN = [
    "--mixed_precision", "bf16", "--train_batch_size", "4", "--max_train_steps", "2", "--checkpointing_steps", "100",
    "--validation_steps", "100", "--report_to", "none", "--tangent_warmup_steps", "1", "--learning_rate", "1e-3",
]  # fmt: skip
COMMON = ["--dataset_name", "digits", "--resolution", "16", *RUN]


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state, fixed by the first `Accelerator` (its mixed precision included): each
    in-process run starts from a clean one and leaves one behind."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _distill(args):
    load_script("distill").main(args)


def _check_run(out, steps=2, prompts=None):
    """Finite logged losses, bf16 recorded, and the saved student loads and samples finite images (1 and 2 steps)."""
    with open(os.path.join(out, "loss_log.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == steps and all(math.isfinite(v) for v in losses), losses
    with open(os.path.join(out, "training_summary.json")) as f:
        summary = json.load(f)
    assert summary["mixed_precision"] == "bf16" and summary["steps"] == steps and summary["skipped_steps"] == 0
    pipe = SCMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    call = {"prompt": prompts} if prompts else {"batch_size": 2}
    for steps in (1, 2):
        images = pipe(**call, num_inference_steps=steps, output_type="pt", generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(images.images).all() and images.images.shape[0] == 2
    return pipe


@pytest.mark.parametrize(
    "method, extra",
    [
        ("scd", []),
        ("sct", []),  # --teacher starts the student only (SCTObjective)
        ("cd", []),
        ("ct", []),
        ("tcm", ["--stage2_max_train_steps", "2"]),
        ("scd", ["--dmd_weight", "0.5", "--dmd_start_step", "0", "--checkpointing_steps", "2"]),
    ],
    ids=["scd", "sct", "cd", "ct", "tcm", "scd-dmd"],
)
def test_every_method_trains_in_bf16_on_cpu(method, extra, teacher_dir, tmp_path, fresh_accelerate_state):  # noqa: F811
    out = str(tmp_path / method)
    _distill(["--method", method, "--teacher", teacher_dir, *COMMON, *extra, "--output_dir", out])
    _check_run(out)
    if method == "tcm":  # Stage 1 trained in bf16 too, and its pipeline is kept
        _check_run(os.path.join(out, "stage1"))
    if "--dmd_weight" in extra:  # the score regularizer ran: its fake-score network and optimizer are checkpointed
        checkpoint = os.path.join(out, "checkpoint-2")
        assert {"fake_score.safetensors", "optimizer_fake_score.pt"} <= set(os.listdir(checkpoint))
        state = torch.load(os.path.join(checkpoint, "optimizer_fake_score.pt"), weights_only=True)
        assert len(state["state"]) > 0


def test_lora_student_trains_in_bf16_on_cpu(tmp_path, fresh_accelerate_state):
    """A UNet2DConditionModel (Stable Diffusion 1.5 family, prompt-only data: the teacher's own ODE samples)."""
    from t2i_pipelines import IMAGE_SIZE, save_tiny_pipeline
    from test_t2i_distill import PROMPTS

    teacher = tmp_path / "sd15"
    save_tiny_pipeline("sd15", teacher)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = str(tmp_path / "lora")
    args = ["--teacher", str(teacher), "--dataset_name", str(prompts), "--lora_rank", "2", "--teacher_ode_steps", "2"]
    args += [*RUN, "--resolution", str(IMAGE_SIZE), "--num_validation_images", "2", "--output_dir", out]
    _distill(args + ["--validation_prompts", *PROMPTS[:2]])
    assert os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors"))
    _check_run(out, prompts=PROMPTS[:2])


def test_fsdp_two_processes_train_in_bf16_on_cpu(teacher_dir, tmp_path):  # noqa: F811
    out = str(tmp_path / "fsdp")
    _launch(["--teacher", teacher_dir, "--fsdp", *COMMON, "--output_dir", out])
    with open(os.path.join(out, "training_summary.json")) as f:
        summary = json.load(f)
    assert summary["sharded"] and summary["num_processes"] == 2
    _check_run(out)


def test_sct_and_ct_do_not_use_a_given_teacher():
    """`--method sct/ct --teacher PATH` starts the student from the teacher and trains without it (distill.py passes
    the teacher to every method's objective): the loss equals the loss without a teacher, and differs from sCD's /
    CD's with it."""
    student = TrigFlowDenoiser(tiny_unet(seed=2), "trigflow", sigma_data=0.5)
    teacher = TrigFlowDenoiser(tiny_unet(seed=1).eval(), "trigflow", sigma_data=0.5)
    batch = {"x0": torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))}

    def loss(method, loss_fn, teacher):
        objective = OBJECTIVES[method](
            loss_fn, student, lambda b: (b["x0"], {}, {}), torch.Generator().manual_seed(0), teacher=teacher
        )
        assert (objective.teacher is None) == (method in ("sct", "ct") or teacher is None)
        torch.manual_seed(0)
        return objective(batch, 3)[0]

    for trained, distilled, loss_fn in (
        ("sct", "scd", SCMLoss(tangent_warmup_steps=10, adaptive_weighting=False)),
        ("ct", "cd", ConsistencyLoss()),
    ):
        alone = loss(trained, loss_fn, None)
        assert torch.equal(loss(trained, loss_fn, teacher), alone)
        assert not torch.allclose(loss(distilled, loss_fn, teacher), alone)
