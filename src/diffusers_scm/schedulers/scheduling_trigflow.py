"""`TrigFlowScheduler`: one-, two- and k-step consistency sampling (SPEC.md section 4)."""

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..parameterizations import parameterization_from_config


@dataclass
class TrigFlowSchedulerOutput(BaseOutput):
    """
    Output of the TrigFlow schedulers' `step`.

    Args:
        prev_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            The sample at the next time of the schedule (the data estimate after the last step).
        pred_original_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            The data estimate x0 made at this step.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def _to_time_tensor(values, device=None) -> torch.Tensor:
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float32)
    return t.to(device=device, dtype=torch.float32).flatten()


class TrigFlowSchedulerMixin:
    """Parameterization, time bookkeeping and noise helpers shared by the two TrigFlow schedulers."""

    @property
    def parameterization(self):
        if getattr(self, "_parameterization", None) is None:
            self._parameterization = parameterization_from_config(self.config)
        return self._parameterization

    @property
    def init_noise_sigma(self) -> float:
        """Latents are unit Gaussian noise times this: x at t_max is sigma_data n (SPEC.md section 4)."""
        return self.config.sigma_data

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start stepping at this index of `timesteps` (for pipelines that begin mid-schedule)."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        timestep = torch.as_tensor(timestep, dtype=schedule.dtype, device=schedule.device)
        indices = (schedule - timestep).abs().le(1e-6).nonzero()
        if len(indices) == 0:
            raise ValueError(f"Timestep {float(timestep):.6f} is not in the schedule {schedule.tolist()}.")
        return indices[0].item()

    def _init_step_index(self, timestep):
        self._step_index = self.index_for_timestep(timestep) if self.begin_index is None else self._begin_index

    def _default_max_timesteps(self) -> float:
        if self.config.max_timesteps is not None:
            return float(self.config.max_timesteps)
        return math.atan(80.0 / self.config.sigma_data)

    def _check_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        if timesteps.numel() == 0:
            raise ValueError("`timesteps` is empty: give at least one time in (0, pi/2].")
        if not torch.isfinite(timesteps).all():
            raise ValueError(f"`timesteps` must be finite times in (0, pi/2], got {timesteps.tolist()}.")
        if (timesteps <= 0).any() or (timesteps > math.pi / 2 + 1e-4).any():
            raise ValueError(f"TrigFlow times must lie in (0, pi/2], got {timesteps.tolist()}.")
        if (timesteps[1:] >= timesteps[:-1]).any():
            raise ValueError(f"`timesteps` must be strictly decreasing, got {timesteps.tolist()}.")
        return timesteps

    def model_inputs(self, sample: torch.Tensor, timestep):
        """`(network_sample, network_timestep)` for TrigFlow `(sample, timestep)` through the parameterization."""
        return self.parameterization.model_inputs(sample, timestep)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The network's sample input at `timestep` (x_t / sigma_data for TrigFlow and EDM networks).

        Works before `set_timesteps`; without a timestep the sample is returned unchanged.
        """
        if timestep is None:
            return sample
        return self.parameterization.model_inputs(sample, timestep)[0]

    def model_output_to_x0(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
        """Turn the network's raw output at `(sample, timestep)` into the data estimate x0 (SPEC.md section 1)."""
        x0 = self.parameterization.predict_x0(model_output.float(), sample.float(), timestep)
        return x0.to(sample.dtype)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = cos(t) x0 + sin(t) sigma_data noise, with `noise` unit Gaussian (SPEC.md section 1)."""
        t = torch.as_tensor(timesteps, device=original_samples.device, dtype=torch.float32)
        if t.ndim == 1:
            t = t.reshape(-1, *([1] * (original_samples.ndim - 1)))
        x_t = torch.cos(t) * original_samples.float() + torch.sin(t) * self.config.sigma_data * noise.float()
        return x_t.to(original_samples.dtype)

    def __len__(self):
        return self.config.num_train_timesteps


class TrigFlowScheduler(TrigFlowSchedulerMixin, SchedulerMixin, ConfigMixin):
    """
    Consistency sampling of a TrigFlow consistency model (SPEC.md section 4):

        one step:  x = sigma_data n at t_max;  x0 = f(x, t_max)
        k steps:   for each next time t_i:  x = cos(t_i) x0 + sin(t_i) sigma_data n_i;  x0 = f(x, t_i)

    `step` takes the network's raw output, which the configured parameterization turns into x0, so students saved as
    plain diffusers networks of any family sample correctly. No noise is drawn after the last step.

    Args:
        sigma_data (`float`, defaults to 0.5): standard deviation of the data.
        parameterization (`str`, defaults to `"trigflow"`): the network's family, a name accepted by
            `get_parameterization` ("trigflow", "edm", "flow_matching", "vp_epsilon", "vp_v").
        prediction_type (`str`, *optional*): for "trigflow", `"flow"` (F, the default) or `"velocity"`
            (sigma_data F, diffusers' `SCMScheduler` convention); for "edm", `"epsilon"` or `"v_prediction"`.
        timestep_scale (`float`, *optional*): network time scale ("trigflow": 1.0, "flow_matching": 1000.0).
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the DDPM table of a VP network,
            with `DDPMScheduler`'s names and defaults.
        preconditioning, vp_beta_d, vp_beta_min, iddpm_c1, iddpm_c2 (*optional*): for "edm", which of NVlabs'
            wrappers the network was trained in ("edm", "vp", "ve", "iddpm") and its constants, i.e. its c_noise map
            (see `EDMParameterization`; SPEC.md section 10), so a student of a converted VP/VE/iDDPM teacher keeps
            it. `None` keeps the parameterization's default.
        max_timesteps (`float`, *optional*): first time t_max; defaults to arctan(80 / sigma_data).
        intermediate_timesteps (`float` or `list[float]`, defaults to 1.1): the middle time for two steps, or a
            list of k - 1 times for k steps; any other step count splits [0, t_max] evenly in angle.
        dividing_timestep (`float`, *optional*): for a truncated consistency model (TCM Stage 2, SPEC.md section 5),
            the dividing time t' below which the network was not trained. Every sampling time must then be at least
            t' (the intermediate times included), and other step counts split [t', t_max] evenly in angle.
    """

    order = 1
    _compatibles = []

    @register_to_config
    def __init__(
        self,
        sigma_data: float = 0.5,
        parameterization: str = "trigflow",
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
        self._parameterization = parameterization_from_config(self.config)  # validates the config early
        if dividing_timestep is not None and intermediate_timesteps is not None:
            mids = (
                intermediate_timesteps
                if isinstance(intermediate_timesteps, (list, tuple))
                else [intermediate_timesteps]
            )
            self._check_dividing(torch.tensor([float(m) for m in mids]), "intermediate_timesteps")
        self.num_inference_steps = None
        self.timesteps = torch.tensor([self._default_max_timesteps()], dtype=torch.float32)
        self._step_index = None
        self._begin_index = None

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """Like `ConfigMixin.from_config`, and also accepts a diffusers `SCMScheduler` config.

        An `SCMScheduler` config (`prediction_type="trigflow"`) becomes a "trigflow" parameterization whose model
        output is the velocity sigma_data F, as `SCMScheduler.step` expects, with its default times
        (t_max = 1.5708, intermediate 1.3), so the two schedulers give the same samples.
        """
        if config is not None and not isinstance(config, dict):
            config = dict(config)
        if config is not None and (
            config.get("_class_name") == "SCMScheduler" or config.get("prediction_type") == "trigflow"
        ):
            config = {k: v for k, v in config.items() if not k.startswith("_")}
            config.update(parameterization="trigflow", prediction_type="velocity")
            config.setdefault("max_timesteps", 1.57080)
            config.setdefault("intermediate_timesteps", 1.3)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _check_dividing(self, timesteps: torch.Tensor, what: str = "timesteps"):
        t_div = self.config.dividing_timestep
        if t_div is not None and (timesteps < t_div - 1e-6).any():
            raise ValueError(
                f"This truncated consistency model was trained on t >= dividing_timestep = {t_div:.6f} only, but "
                f"`{what}` has {timesteps.tolist()}. Sample below t' with the Stage-1 model (saved in `stage1/` "
                "next to it)."
            )

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        timesteps: list[float] | torch.Tensor | None = None,
        device: str | torch.device | None = None,
    ):
        """
        Set the times at which the network is called.

        Args:
            num_inference_steps (`int`, *optional*): number of network evaluations.
            timesteps (`list[float]` or `torch.Tensor`, *optional*): explicit decreasing times in (0, pi/2]; a
                trailing 0 (the terminal time, as in `SCMScheduler`) is dropped.
            device (`str` or `torch.device`, *optional*): where to put `timesteps`.
        """
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("Pass exactly one of `num_inference_steps` and `timesteps`.")
        if timesteps is not None:
            ts = _to_time_tensor(timesteps)
            if ts.numel() > 1 and float(ts[-1]) == 0.0:
                ts = ts[:-1]
        else:
            if int(num_inference_steps) < 1:
                raise ValueError(f"`num_inference_steps` must be at least 1, got {num_inference_steps}.")
            k = int(num_inference_steps)
            t_max = self._default_max_timesteps()
            mid = self.config.intermediate_timesteps
            if isinstance(mid, (int, float)) and k == 2:
                ts = torch.tensor([t_max, float(mid)], dtype=torch.float32)
            elif isinstance(mid, (list, tuple)) and len(mid) == k - 1:
                ts = torch.tensor([t_max, *mid], dtype=torch.float32)
            elif self.config.dividing_timestep is not None and k > 1:  # truncated model: [t', t_max] evenly
                ts = torch.linspace(t_max, self.config.dividing_timestep, k, dtype=torch.float64).float()
            else:
                ts = torch.linspace(t_max, 0, k + 1, dtype=torch.float64)[:-1].float()
        self._check_dividing(ts)
        self.timesteps = self._check_timesteps(ts).to(device)
        self.num_inference_steps = len(self.timesteps)
        self._step_index = None
        self._begin_index = None

    def flow_sigmas(self, num_inference_steps: int) -> list[float]:
        """
        The flow times s = sigma_data sin t / (cos t + sigma_data sin t) (SPEC.md section 2) of the times that
        `set_timesteps(num_inference_steps)` gives: the `sigmas=` with which a flow family's own pipeline and
        diffusers' `FlowMatchLCMScheduler(shift=1.0)` sample a flow-matching student at the same times.
        """
        saved = (self.timesteps, self.num_inference_steps, self._step_index, self._begin_index)
        self.set_timesteps(num_inference_steps)
        t = self.timesteps.double()
        self.timesteps, self.num_inference_steps, self._step_index, self._begin_index = saved
        sd = self.config.sigma_data
        return (sd * torch.sin(t) / (torch.cos(t) + sd * torch.sin(t))).tolist()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> TrigFlowSchedulerOutput | tuple:
        """
        One consistency step: x0 = f(sample, timestep), then re-noise to the next time (SPEC.md section 4).

        Args:
            model_output (`torch.Tensor`): the network's raw output at `(sample, timestep)`.
            timestep (`float` or `torch.Tensor`): the current time, an entry of `timesteps`.
            sample (`torch.Tensor`): the current x_t.
            generator (`torch.Generator` or a list of them, *optional*): for the fresh noise of the next step.
            return_dict (`bool`, defaults to `True`): return a `TrigFlowSchedulerOutput` or a tuple.
        """
        if self.num_inference_steps is None:
            raise ValueError("Call `set_timesteps` before `step`.")
        if self.step_index is None:
            self._init_step_index(timestep)
        s = self.timesteps[self.step_index]
        x0 = self.model_output_to_x0(model_output, s, sample)
        if self.step_index + 1 < len(self.timesteps):
            t = self.timesteps[self.step_index + 1].float()
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = (torch.cos(t) * x0.float() + torch.sin(t) * self.config.sigma_data * noise.float()).to(
                sample.dtype
            )
        else:
            prev_sample = x0
        self._step_index += 1
        if not return_dict:
            return (prev_sample, x0)
        return TrigFlowSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
