"""One call shape for every training method: `loss, logs = objective(batch, step)`.

An objective binds a loss (`SCMLoss`, `ConsistencyLoss`, `TCMLoss`, `TrigFlowDiffusionLoss`, `EDMLoss`,
`FlowMatchingLoss`) to the networks it trains and reads, and to the script's `inputs(batch) -> (x0, conditioning,
guidance)`, so the training loop (`machinery.loop.train_loop`) has no branch per method. As in k-diffusion's
wrappers, each subclass overrides one small method: `times` (the time proposal) or `terms` (how its loss is called).

    objective = OBJECTIVES[args.method](loss_fn, student, inputs, generator, teacher=teacher, logvar_head=head)
    loss, logs = objective(batch, step)

A new method is one class here (plus its loss and its flags in the script).
"""

from abc import ABC, abstractmethod

import torch

from . import edm
from .time_proposals import lognormal_times


__all__ = [
    "Objective",
    "SCMObjective",
    "SCTObjective",
    "ConsistencyObjective",
    "CTObjective",
    "TCMObjective",
    "DiffusionObjective",
    "FlowMatchingObjective",
    "EDMObjective",
    "OBJECTIVES",
]


class Objective(ABC):
    """
    Base class: draws the times and the noise of a batch and calls `terms`, which each subclass defines.

    Args:
        loss_fn (`callable`): the method's loss object.
        model (`torch.nn.Module`): the network being trained (a `TrigFlowDenoiser`, or a `FlowMatchingModel`).
        inputs (`callable`): `inputs(batch) -> (x0, conditioning, guidance)`: the clean samples, the network's
            conditioning (class labels, prompt embeddings) and the teacher's guidance inputs
            (`uncond_conditioning`, `teacher_guidance`; empty without guidance).
        generator (`torch.Generator`): draws the noise and the times (checkpointed by the loop, so a resumed run
            draws what the uninterrupted one would).
        teacher (`TrigFlowDenoiser`, *optional*): the frozen teacher (distillation).
        logvar_head (`LogVarHead`, *optional*): the adaptive weighting (SPEC.md section 3), for the objectives that
            use one.
        regularizer (`callable`, *optional*): `regularizer(shape, conditioning, guidance, step) -> logs`, run before
            the loss (the score regularizer, which takes its own backward pass); a `"dmd_loss"` in its logs is added
            to the logged loss with `regularizer_weight`.
        regularizer_weight (`float`, defaults to 0): see `regularizer`.
    """

    def __init__(
        self,
        loss_fn,
        model,
        inputs,
        generator: torch.Generator,
        teacher=None,
        logvar_head=None,
        regularizer=None,
        regularizer_weight: float = 0.0,
    ):
        self.loss_fn, self.model, self.inputs, self.generator = loss_fn, model, inputs, generator
        self.teacher, self.logvar_head = teacher, logvar_head
        self.regularizer, self.regularizer_weight = regularizer, regularizer_weight

    def __call__(self, batch, step: int) -> tuple[torch.Tensor, dict]:
        x0, cond, guidance = self.inputs(batch)
        logs = self.regularizer(x0.shape, cond, self.guidance(guidance), step) if self.regularizer else {}
        times = self.times(x0.shape[0])
        noise = self.noise(x0)
        loss, loss_logs = self.terms(x0, noise, times, step, {**cond, **self.guidance(guidance)})
        if "dmd_loss" in logs:  # its gradient is already in the student's: logged with the step's loss
            loss = loss + self.regularizer_weight * logs["dmd_loss"]
        return loss, {**loss_logs, **logs}

    def guidance(self, guidance: dict) -> dict:
        """The guidance inputs this objective's loss takes (default: the unconditional branch only; a per-sample
        guidance scale is an error)."""
        if isinstance(guidance.get("teacher_guidance"), torch.Tensor):
            raise ValueError("--guidance_scale_range is for --method scd/sct (and continuous TCM) only.")
        return {k: v for k, v in guidance.items() if k == "uncond_conditioning"}

    def times(self, batch_size: int) -> dict:
        """The loss's time keywords for one batch (default: none: the loss draws its own)."""
        return {}

    def noise(self, x0: torch.Tensor) -> torch.Tensor | None:
        """The batch's noise (None: the loss draws its own)."""
        return torch.randn(x0.shape, generator=self.generator, device=self.generator.device)

    @abstractmethod
    def terms(self, x0, noise, times: dict, step: int, cond: dict) -> tuple[torch.Tensor, dict]:
        """The loss of one batch: `(loss, logs)`."""


class _LogNormalTimes(Objective):
    """Times from the loss's log-normal proposal: ln(sigma_data tan t) ~ N(P_mean, P_std^2) (SPEC.md section 3)."""

    def times(self, batch_size: int) -> dict:
        loss, g = self.loss_fn, self.generator
        return {
            "t": lognormal_times(batch_size, loss.P_mean, loss.P_std, loss.sigma_data, device=g.device, generator=g)
        }


class SCMObjective(_LogNormalTimes):
    """sCD / sCT (SPEC.md section 3): the teacher's (guided) velocity, the tangent loss."""

    def guidance(self, guidance: dict) -> dict:
        return dict(guidance)  # per-sample guidance scales too (guidance-conditioned students)

    def terms(self, x0, noise, times, step, cond):
        return self.loss_fn(
            self.model, x0, teacher=self.teacher, step=step, noise=noise, logvar_head=self.logvar_head, **times, **cond
        )


class ConsistencyObjective(_LogNormalTimes):
    """Discrete-time CD / CT (SPEC.md section 5): one exact teacher step (CD) or the true velocity (CT); no adaptive
    weighting."""

    def terms(self, x0, noise, times, step, cond):
        return self.loss_fn(self.model, x0, teacher=self.teacher, step=step, noise=noise, **times, **cond)


class _WithoutTeacher:
    """Consistency training without a teacher: the loss takes the true velocity cos(t) z - sin(t) x0 of the noised
    sample instead of a teacher's (SPEC.md section 3). A `teacher` given is not used (`distill.py --method sct --teacher
    PATH` only starts the student from it)."""

    def __init__(self, loss_fn, model, inputs, generator, teacher=None, **kwargs):
        super().__init__(loss_fn, model, inputs, generator, **kwargs)


class SCTObjective(_WithoutTeacher, SCMObjective):
    """sCT (SPEC.md section 3): the tangent loss of `SCMObjective` without a teacher."""


class CTObjective(_WithoutTeacher, ConsistencyObjective):
    """Discrete-time consistency training (SPEC.md section 5): `ConsistencyObjective` without a teacher."""


class TCMObjective(Objective):
    """TCM Stage 2 (SPEC.md section 5): times on [t', T] with boundary samples at t', the frozen Stage-1 model below
    t'.

    Args:
        stage1 (`TrigFlowDenoiser`): the frozen Stage-1 consistency model.
        **kwargs: as `Objective`.
    """

    def __init__(self, loss_fn, model, inputs, generator, stage1=None, **kwargs):
        super().__init__(loss_fn, model, inputs, generator, **kwargs)
        self.stage1 = stage1

    def times(self, batch_size: int) -> dict:
        t, is_boundary = self.loss_fn.sample_times(batch_size, device=self.generator.device, generator=self.generator)
        return {"t": t, "is_boundary": is_boundary}

    def terms(self, x0, noise, times, step, cond):
        return self.loss_fn(
            self.model,
            self.stage1,
            x0,
            self.teacher,
            step,
            times["t"],
            times["is_boundary"],
            noise,
            logvar_head=self.logvar_head,
            **cond,
        )


class DiffusionObjective(_LogNormalTimes):
    """The TrigFlow diffusion loss that trains teachers (SPEC.md section 1): the velocity target."""

    def terms(self, x0, noise, times, step, cond):
        return self.loss_fn(self.model, x0, noise=noise, logvar_head=self.logvar_head, **times, **cond)


class FlowMatchingObjective(Objective):
    """Rectified-flow training of text-to-image teachers (SPEC.md section 2); the loss draws its own times and noise
    from the generator (diffusers' timestep densities)."""

    def noise(self, x0):
        return None

    def terms(self, x0, noise, times, step, cond):
        return self.loss_fn(self.model, x0, generator=self.generator, **cond)


class EDMObjective(DiffusionObjective):
    """EDM / EDM2 training (`EDMLoss`, SPEC.md section 10): log-normal sigma, EDM's weighting, and EDM2's uncertainty
    u(sigma) from the network's own head where it has one (`EDM2UNet2DModel.logvar`, trained with the network), else
    from `logvar_head`.

    Args:
        network_logvar (`bool`, defaults to `True`): use the network's own uncertainty head when it has one; False:
            `logvar_head` (None: EDM's loss without uncertainty weighting).
        **kwargs: as `Objective`.
    """

    def __init__(self, loss_fn, model, inputs, generator, network_logvar: bool = True, **kwargs):
        super().__init__(loss_fn, model, inputs, generator, **kwargs)
        own = edm.network_logvar(model) if network_logvar else None
        self.logvar_head = own or self.logvar_head


# distill.py's --method: the objective of each
OBJECTIVES = {
    "scd": SCMObjective,
    "sct": SCTObjective,
    "cd": ConsistencyObjective,
    "ct": CTObjective,
    "tcm": TCMObjective,
}
