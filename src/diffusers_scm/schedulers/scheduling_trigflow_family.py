"""`TrigFlowFamilyScheduler`: consistency sampling (SPEC.md section 4) inside a family's own diffusers pipeline, in
that family's time units and latent state.

Some family pipelines (WanPipeline, and other video pipelines) take no `sigmas=`: they only call
`scheduler.set_timesteps(num_inference_steps)`, pass each entry of `scheduler.timesteps` to their network as it is,
and hand the network's output to `scheduler.step(model_output, timestep, latents)`. Their latents are the network's
own input (a flow-matching state x_s = (1 - s) x0 + s n, say), not TrigFlow's x_t. This scheduler lets such a pipeline
sample a consistency student at exactly the times `TrigFlowScheduler` uses:

    from diffusers import WanPipeline
    pipe = WanPipeline.from_pretrained("my-video-student")  # the student folder carries this scheduler
    video = pipe(prompt="a red fox", num_inference_steps=2, guidance_scale=1.0).frames

It holds the same configuration as `TrigFlowScheduler` (the student's parameterization, t_max, the intermediate
times, TCM's dividing time) and maps everything through the parameterization (SPEC.md section 2), whose network input
is c_in(t) x_t and whose network time is c_noise(t):

    timesteps[i] = c_noise(t_i)                         (flow matching: 1000 s_i)
    step:  x_t  = latents / c_in(t_i)
           x0   = predict_x0(model_output, x_t, t_i)
           next = c_in(t_{i+1}) (cos t_{i+1} x0 + sin t_{i+1} sigma_data n)     fresh unit noise n
           last step: x0 itself

so, from the same unit noise (the pipeline draws latents = init_noise_sigma n, which for flow matching at t_max = pi/2
is n itself) and the same re-noising draws, the family pipeline and `SCMPipeline` with the equivalent
`TrigFlowScheduler` (`trigflow_scheduler()`) give the same samples. `SCMPipeline` samples a folder that carries this
scheduler through `trigflow_scheduler()`.
"""

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .scheduling_trigflow import TrigFlowScheduler, TrigFlowSchedulerOutput


__all__ = ["TrigFlowFamilyScheduler"]


class TrigFlowFamilyScheduler(SchedulerMixin, ConfigMixin):
    """
    The consistency sampler of `TrigFlowScheduler` (SPEC.md section 4) in a family pipeline's own time units and
    latent state (see the module docstring): `set_timesteps(num_inference_steps)`, `timesteps` (the network's time
    input, e.g. 1000 s for flow matching), `sigmas` (the flow times s for flow matching, else sigma_data tan t, with a
    trailing 0 as diffusers' schedulers have) and `step(model_output, timestep, sample)`.

    It takes the same arguments as `TrigFlowScheduler` (the student's parameterization and its constants,
    `max_timesteps`, `intermediate_timesteps`, `dividing_timestep`). A student saved by `examples/distill.py` for a
    family whose pipeline takes no `sigmas=` (`Family.own_sampler == "scheduler"`) carries it with its
    `TrigFlowScheduler`'s configuration (`TrigFlowFamilyScheduler.from_trigflow(trigflow_scheduler)`).

    Args:
        sigma_data (`float`, defaults to 0.5): standard deviation of the data.
        parameterization (`str`, defaults to `"flow_matching"`): the network's family (see `TrigFlowScheduler`).
        prediction_type, timestep_scale, num_train_timesteps, beta_start, beta_end: as `TrigFlowScheduler`'s.
        beta_schedule, trained_betas, preconditioning, vp_beta_d, vp_beta_min: as `TrigFlowScheduler`'s.
        iddpm_c1, iddpm_c2: as `TrigFlowScheduler`'s.
        max_timesteps (`float`, *optional*): the first time t_max (pi/2 for a flow-matching student).
        intermediate_timesteps (`float` or `list[float]`, defaults to 1.1): the middle time(s) of 2 (or k) steps.
        dividing_timestep (`float`, *optional*): a truncated consistency model's t' (TCM Stage 2).
    """

    order = 1
    _compatibles = []

    @register_to_config
    def __init__(
        self,
        sigma_data: float = 0.5,
        parameterization: str = "flow_matching",
        prediction_type: str | None = None,
        timestep_scale: float | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        preconditioning: str | None = None,
        vp_beta_d: float | None = None,
        vp_beta_min: float | None = None,
        iddpm_c1: float | None = None,
        iddpm_c2: float | None = None,
        max_timesteps: float | None = None,
        intermediate_timesteps: float | list[float] | None = 1.1,
        dividing_timestep: float | None = None,
    ):
        self._trigflow = self.trigflow_scheduler()  # validates the configuration
        self.times = None  # TrigFlow times of the schedule
        self.timesteps = None
        self.sigmas = None
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None

    def trigflow_scheduler(self) -> TrigFlowScheduler:
        """The equivalent `TrigFlowScheduler` (same configuration), in TrigFlow times and x_t: what `SCMPipeline`
        samples with."""
        config = {k: v for k, v in self.config.items() if not k.startswith("_")}
        return TrigFlowScheduler(**config)

    @classmethod
    def from_trigflow(cls, scheduler: TrigFlowScheduler) -> "TrigFlowFamilyScheduler":
        """This scheduler with the configuration of a `TrigFlowScheduler` (a student's consistency sampler)."""
        return cls(**{k: v for k, v in scheduler.config.items() if not k.startswith("_")})

    @property
    def parameterization(self):
        return self._trigflow.parameterization

    def _c_in(self, t: torch.Tensor) -> torch.Tensor:
        """The network-input scale c_in(t) of the parameterization (its input is c_in(t) x_t), as a 0-d tensor."""
        one = torch.ones(1, dtype=torch.float64)
        return self.parameterization.model_inputs(one, t.double().reshape(1))[0].reshape(())

    @property
    def init_noise_sigma(self) -> float:
        """The pipeline's starting latents are unit noise times this: c_in(t_max) sigma_data (1 for flow matching
        at t_max = pi/2)."""
        t_max = torch.tensor(self._trigflow._default_max_timesteps(), dtype=torch.float64)
        return float(self._c_in(t_max) * self.config.sigma_data)

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start stepping at this index of `timesteps` (family pipelines set 0 before their loop)."""
        self._begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The latents are already the network's input: returned unchanged."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[float] | None = None,
        sigmas: list[float] | None = None,
        **kwargs,
    ):
        """
        The schedule of `num_inference_steps` consistency steps (the times of `TrigFlowScheduler.set_timesteps`), as
        the network's time input in `timesteps`.

        Args:
            num_inference_steps (`int`): network evaluations (1 or 2 for a consistency student).
            device (`str` or `torch.device`, *optional*): where to put `timesteps`.
            timesteps (`list[float]`, *optional*): explicit TrigFlow times in (0, pi/2] instead.
            sigmas (`list[float]`, *optional*): only the default grid that a pipeline passes of its own accord
                without `num_inference_steps` (LTXPipeline: linspace(1, 1/n, n)), taken as n steps at the student's
                own times; other `sigmas` are refused (give `num_inference_steps`: the student's times are set by its
                own configuration).
            kwargs: other arguments some pipelines pass (`mu`, ...), unused.
        """
        if sigmas is not None and num_inference_steps is None and timesteps is None:
            n = len(sigmas)
            default = torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64)
            if torch.allclose(torch.as_tensor(sigmas, dtype=torch.float64).flatten(), default, atol=1e-6):
                num_inference_steps, sigmas = n, None
        if sigmas is not None:
            raise ValueError(
                "TrigFlowFamilyScheduler samples at the student's own times: pass `num_inference_steps` (1 or 2), "
                "not `sigmas`."
            )
        if timesteps is not None:
            self._trigflow.set_timesteps(timesteps=timesteps)
        else:
            self._trigflow.set_timesteps(num_inference_steps=num_inference_steps)
        t = self._trigflow.timesteps.double()
        ones = torch.ones(len(t), dtype=torch.float64)
        _, network_time = self.parameterization.model_inputs(ones, t)
        sd = self.config.sigma_data
        if self.config.parameterization == "flow_matching":
            sigmas = sd * torch.sin(t) / (torch.cos(t) + sd * torch.sin(t))
        else:
            sigmas = sd * torch.tan(t.clamp(max=math.pi / 2 - 1e-6))
        self.times = t.float().to(device)
        self.timesteps = network_time.float().to(device)
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).float().to(device)
        self.num_inference_steps = len(t)
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep) -> int:
        timestep = torch.as_tensor(timestep, dtype=self.timesteps.dtype, device=self.timesteps.device)
        found = (self.timesteps - timestep).abs().le(1e-3 * (1 + timestep.abs())).nonzero()
        if len(found) == 0:
            raise ValueError(f"Timestep {float(timestep):.6f} is not in the schedule {self.timesteps.tolist()}.")
        return int(found[0])

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> TrigFlowSchedulerOutput | tuple:
        """
        One consistency step in the family's state (module docstring; SPEC.md section 4): x0 from the network's
        output at the current time, then the state of the next time from x0 and fresh unit noise (drawn with
        `generator`, else the global RNG, as the family pipelines call it); after the last step, x0.

        Args:
            model_output (`torch.Tensor`): the network's raw output (a flow velocity for flow matching).
            timestep (`float` or `torch.Tensor`): the current entry of `timesteps`.
            sample (`torch.Tensor`): the pipeline's current latents (the network's input).
            generator (`torch.Generator` or a list of them, *optional*): for the re-noising draw.
            return_dict (`bool`, defaults to `True`): return a `TrigFlowSchedulerOutput` or a tuple.
        """
        if self.num_inference_steps is None:
            raise ValueError("Call `set_timesteps` before `step`.")
        if self._step_index is None:
            self._step_index = (
                self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)
            )
        i = self._step_index
        t = self.times[i]
        x_t = sample.float() / self._c_in(t).float().to(sample.device)
        x0 = self.parameterization.predict_x0(model_output.float(), x_t, t.to(sample.device))
        if i + 1 < len(self.times):
            t_next = self.times[i + 1].float()
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            x_next = torch.cos(t_next) * x0 + torch.sin(t_next) * self.config.sigma_data * noise.float()
            prev_sample = (self._c_in(t_next).float().to(sample.device) * x_next).to(sample.dtype)
        else:
            prev_sample = x0.to(sample.dtype)
        self._step_index += 1
        x0 = x0.to(sample.dtype)
        if not return_dict:
            return (prev_sample, x0)
        return TrigFlowSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def __len__(self):
        return self.config.num_train_timesteps
