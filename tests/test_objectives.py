"""The one objective interface (`loss, logs = objective(batch, step)`): each method's objective gives what its loss
gives when called by hand with the times and noise drawn in the documented order from the same generator."""

import pytest
import torch
from conftest import tiny_unet

from diffusers_scm import TrigFlowDenoiser
from diffusers_scm.training import (
    ConsistencyLoss,
    LogVarHead,
    SCMLoss,
    TCMLoss,
    TrigFlowDiffusionLoss,
    lognormal_times,
)
from diffusers_scm.training.objectives import (
    OBJECTIVES,
    DiffusionObjective,
    Objective,
    SCMObjective,
    TCMObjective,
)


SD = 0.5


def _nets(**config):
    teacher = TrigFlowDenoiser(tiny_unet(seed=1, **config).eval(), "trigflow", sigma_data=SD)
    student = TrigFlowDenoiser(tiny_unet(seed=2, **config), "trigflow", sigma_data=SD)
    return student, teacher


def _batch():
    return {"pixel_values": torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))}


def _inputs(batch):
    return batch["pixel_values"], {}, {}


def _loss(method, adaptive=True):
    if method in ("scd", "sct"):
        return SCMLoss(sigma_data=SD, P_mean=-1.0, P_std=1.4, tangent_warmup_steps=10, adaptive_weighting=adaptive)
    if method in ("cd", "ct"):
        return ConsistencyLoss(sigma_data=SD, P_mean=-1.0, P_std=1.4, stage_steps=5)
    return TCMLoss("continuous", SCMLoss(sigma_data=SD), sigma_data=SD)


@pytest.mark.parametrize("method", ["scd", "sct", "cd", "ct", "tcm"])
def test_every_method_is_called_the_same_way_and_equals_its_loss_by_hand(method):
    student, teacher = _nets()
    teacher = None if method in ("sct", "ct") else teacher
    stage1 = TrigFlowDenoiser(tiny_unet(seed=3).eval(), "trigflow", sigma_data=SD) if method == "tcm" else None
    loss_fn = _loss(method)
    head = LogVarHead() if method in ("scd", "sct", "tcm") else None
    extra = {"stage1": stage1} if stage1 is not None else {}
    objective = OBJECTIVES[method](
        loss_fn, student, _inputs, torch.Generator().manual_seed(0), teacher=teacher, logvar_head=head, **extra
    )
    assert isinstance(objective, Objective)
    torch.manual_seed(0)
    loss, logs = objective(_batch(), 3)

    g = torch.Generator().manual_seed(0)  # by hand: times first, then the noise, from the same generator
    x0 = _batch()["pixel_values"]
    if method == "tcm":
        t, is_boundary = loss_fn.sample_times(4, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        torch.manual_seed(0)
        expected, _ = loss_fn(student, stage1, x0, teacher, 3, t, is_boundary, noise, logvar_head=head)
    else:
        t = lognormal_times(4, -1.0, 1.4, SD, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        torch.manual_seed(0)
        kwargs = {"logvar_head": head} if head is not None else {}
        expected, _ = loss_fn(student, x0, teacher=teacher, step=3, t=t, noise=noise, **kwargs)
    assert torch.isfinite(loss) and float(loss.detach()) == pytest.approx(float(expected), rel=1e-6, abs=1e-8)
    assert "t" in logs


def test_diffusion_objective_equals_the_teacher_loss_by_hand():
    model = TrigFlowDenoiser(tiny_unet(seed=1), "trigflow", sigma_data=SD)
    loss_fn = TrigFlowDiffusionLoss(SD, -1.0, 1.4)
    loss, _ = DiffusionObjective(loss_fn, model, _inputs, torch.Generator().manual_seed(7))(_batch(), 0)
    g = torch.Generator().manual_seed(7)
    x0 = _batch()["pixel_values"]
    t = lognormal_times(4, -1.0, 1.4, SD, generator=g)
    expected, _ = loss_fn(model, x0, t=t, noise=torch.randn(x0.shape, generator=g))
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)


def test_per_sample_guidance_goes_to_scm_only_and_the_regularizer_runs_first():
    student, teacher = _nets(num_class_embeds=10)
    w = torch.full((4,), 2.0)
    labels = torch.tensor([1, 2, 3, 4])
    calls = []

    def guided_inputs(batch):
        uncond = {"class_labels": torch.zeros_like(labels)}
        return batch["pixel_values"], {"class_labels": labels}, {"uncond_conditioning": uncond, "teacher_guidance": w}

    def regularizer(shape, cond, guidance, step):
        calls.append((tuple(shape), guidance["teacher_guidance"] is w, step))
        return {"dmd_loss": torch.tensor(0.5)}

    scm = SCMObjective(
        _loss("scd", adaptive=False),
        student,
        guided_inputs,
        torch.Generator().manual_seed(0),
        teacher=teacher,
        regularizer=regularizer,
        regularizer_weight=2.0,
    )
    loss, logs = scm(_batch(), 1)
    assert calls == [((4, 1, 8, 8), True, 1)] and float(logs["dmd_loss"]) == 0.5
    plain, _ = SCMObjective(
        _loss("scd", adaptive=False), student, guided_inputs, torch.Generator().manual_seed(0), teacher=teacher
    )(_batch(), 1)
    assert float(loss) == pytest.approx(float(plain) + 2.0 * 0.5, rel=1e-6)  # the regularizer's term is logged in

    stage1 = TrigFlowDenoiser(tiny_unet(seed=3, num_class_embeds=10).eval(), "trigflow", sigma_data=SD)
    tcm = TCMObjective(_loss("tcm"), student, guided_inputs, torch.Generator(), teacher=teacher, stage1=stage1)
    with pytest.raises(ValueError, match="--guidance_scale_range is for --method scd/sct"):
        tcm(_batch(), 1)
