"""Teacher and student parameterizations in TrigFlow coordinates (SPEC.md sections 1 and 2).

TrigFlow:  x_t = cos(t) x0 + sin(t) z,  z = sigma_data * n,  n ~ N(0, I),  t in [0, pi/2].
The network predicts F = v_t / sigma_data with v_t = dx_t/dt (SPEC.md section 1).

Each class maps TrigFlow (x_t, t) to the inputs its network expects (`model_inputs`) and the network's raw output
to F (`to_trigflow`), and back (`from_trigflow`). Everything is written in torch operations so that reverse- and
forward-mode AD differentiate through `t` as well as `x_t` (SPEC.md section 3 needs dF/dt of the whole function).

`t` may be a Python number, a 0-d tensor or a tensor of shape `(batch,)`; it broadcasts over the trailing dimensions
of `x_t`. The network time returned by `model_inputs` keeps the shape of `t`.
"""

import inspect
import math

import torch


__all__ = [
    "Parameterization",
    "TrigFlowParameterization",
    "EDMParameterization",
    "FlowMatchingParameterization",
    "VPParameterization",
    "get_parameterization",
    "parameterization_from_config",
    "make_alphas_cumprod",
    "PARAMETERIZATIONS",
]

# Smallest distance to 0 and pi/2 used where a time input would take the log of 0 or of infinity (SPEC.md pitfall 8).
TIME_EPS = 1e-6


def _as_time(t, like: torch.Tensor) -> torch.Tensor:
    """`t` as a floating tensor on `like`'s device, at least as precise as `like` (float32 for half inputs)."""
    t = torch.as_tensor(t, device=like.device)
    dtype = torch.promote_types(t.dtype, like.dtype) if t.is_floating_point() else like.dtype
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    return t.to(dtype)


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a 0-d or `(batch,)` time tensor so that it broadcasts over `x` of shape `(batch, ...)`."""
    if t.ndim == 0:
        return t
    if t.ndim == 1 and t.shape[0] in (1, x.shape[0]):
        return t.reshape(-1, *([1] * (x.ndim - 1)))
    raise ValueError(
        f"Time tensor of shape {tuple(t.shape)} does not match a batch of shape {tuple(x.shape)}: pass a scalar or "
        f"one time per sample, shape ({x.shape[0]},)."
    )


class Parameterization:
    """Base class: one teacher family seen in TrigFlow coordinates (SPEC.md section 2).

    Subclasses implement `_network_sample`, `_network_time`, `_to_f` and `_from_f` on broadcast time tensors; the
    public methods handle shapes and dtypes.
    """

    name: str = ""

    def __init__(self, sigma_data: float = 0.5):
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}.")
        self.sigma_data = float(sigma_data)

    # -- public API --------------------------------------------------------------------------------------------
    def model_inputs(self, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Map TrigFlow `(x_t, t)` to `(network_sample, network_timestep)`."""
        tt = _as_time(t, x_t)
        sample = self._network_sample(x_t, _bcast(tt, x_t))
        return sample.to(x_t.dtype), self._network_time(tt)

    def to_trigflow(self, raw_output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """Map the network's raw output at `(x_t, t)` to the TrigFlow output F."""
        tt = _bcast(_as_time(t, x_t), x_t)
        return self._to_f(raw_output, x_t, tt).to(raw_output.dtype)

    def from_trigflow(self, F: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """Inverse of `to_trigflow`: the raw output that this family's network would give for TrigFlow output F."""
        tt = _bcast(_as_time(t, x_t), x_t)
        return self._from_f(F, x_t, tt).to(F.dtype)

    def predict_x0(self, raw_output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """Data estimate x0_hat = cos(t) x_t - sin(t) sigma_data F (SPEC.md section 1)."""
        tt = _bcast(_as_time(t, x_t), x_t)
        F = self._to_f(raw_output, x_t, tt)
        return (torch.cos(tt) * x_t - torch.sin(tt) * self.sigma_data * F).to(x_t.dtype)

    def config(self) -> dict:
        """The keyword arguments that rebuild this object with `get_parameterization(self.name, **config)`."""
        keys = [k for k in inspect.signature(type(self).__init__).parameters if k != "self"]
        return {k: getattr(self, k) for k in keys}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    # -- per-family maps ---------------------------------------------------------------------------------------
    def _network_sample(self, x_t, t):
        raise NotImplementedError

    def _network_time(self, t):
        raise NotImplementedError

    def _to_f(self, raw, x_t, t):
        raise NotImplementedError

    def _from_f(self, F, x_t, t):
        raise NotImplementedError


class TrigFlowParameterization(Parameterization):
    """A network trained in TrigFlow itself: input x_t / sigma_data, time c_noise(t) = timestep_scale * t.

    Args:
        sigma_data (`float`, defaults to 0.5): standard deviation of the data.
        timestep_scale (`float`, defaults to 1.0): the network sees `timestep_scale * t` (SPEC.md section 7).
        prediction_type (`str`, defaults to `"flow"`): `"flow"` when the network predicts F = v_t / sigma_data
            (SPEC.md section 1); `"velocity"` when it predicts v_t = sigma_data F itself, the convention of the
            model output that diffusers' `SCMScheduler.step` takes.
    """

    name = "trigflow"

    def __init__(self, sigma_data: float = 0.5, timestep_scale: float = 1.0, prediction_type: str = "flow"):
        super().__init__(sigma_data)
        if prediction_type not in ("flow", "velocity"):
            raise ValueError(f"Unknown TrigFlow prediction_type {prediction_type!r}: use 'flow' or 'velocity'.")
        self.timestep_scale = float(timestep_scale)
        self.prediction_type = prediction_type

    def _network_sample(self, x_t, t):
        return x_t / self.sigma_data

    def _network_time(self, t):
        return self.timestep_scale * t

    def _to_f(self, raw, x_t, t):
        return raw if self.prediction_type == "flow" else raw / self.sigma_data

    def _from_f(self, F, x_t, t):
        return F if self.prediction_type == "flow" else F * self.sigma_data


class EDMParameterization(Parameterization):
    """EDM / EDM2 preconditioning (Karras et al.), SPEC.md section 2, and the other wrappers of NVlabs' EDM code
    (VPPrecond, VEPrecond, iDDPMPrecond; SPEC.md section 10), all written D(x; sigma) = c_skip x + c_out F(c_in x,
    c_noise) with x = x0 + sigma n.

    In TrigFlow sigma = sigma_data tan(t) and x = x_t / cos(t) (SPEC.md section 10), so that for each wrapper

        preconditioning  network input                        network time c_noise            F from the raw output
        "edm"            x_t / sigma_data                     ln(sigma) / 4                   -raw
        "vp"             x_t / sqrt(cos^2 t + sd^2 sin^2 t)   (M - 1) sigma_vp^-1(sigma)      (raw - s x_t) / cos t
        "ve"             x_t / cos t                          ln(sigma / 2)                   -(raw + s x_t) / cos t
        "iddpm"          x_t / sqrt(cos^2 t + sd^2 sin^2 t)   M - 1 - argmin_j |u_j - sigma|  (raw - s x_t) / cos t

    with s = sin(t) / sigma_data ("edm": c_skip = cos^2 t, c_out = sigma_data sin t; "vp" and "iddpm": c_skip = 1,
    c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1); "ve": c_skip = 1, c_out = sigma, c_in = 1). With
    `prediction_type="v_prediction"` (diffusers' `EDMEulerScheduler` convention, c_out negated; "edm" only) F = +raw.
    iDDPM's time input is piecewise constant in t (its derivative is 0 between the table's midpoints), as in NVlabs'
    code.

    Args:
        sigma_data (`float`, defaults to 0.5): standard deviation of the data (the TrigFlow scale; VP, VE and iDDPM
            networks do not depend on it, any positive value gives the same denoiser).
        prediction_type (`str`, defaults to `"epsilon"`): `"epsilon"` (NVlabs' sign) or `"v_prediction"` ("edm" only).
        preconditioning (`str`, defaults to `"edm"`): "edm" (EDMPrecond, EDM2's Precond), "vp" (VPPrecond), "ve"
            (VEPrecond) or "iddpm" (iDDPMPrecond).
        num_train_timesteps (`int`, defaults to 1000): M of VPPrecond and iDDPMPrecond.
        vp_beta_d (`float`, defaults to 19.9), vp_beta_min (`float`, defaults to 0.1): VPPrecond's schedule
            sigma(tau) = sqrt(exp(beta_d tau^2 / 2 + beta_min tau) - 1).
        iddpm_c1 (`float`, defaults to 0.001), iddpm_c2 (`float`, defaults to 0.008): iDDPMPrecond's clipping of the
            alpha-bar ratio and offset of its cosine schedule, which define its table u_0 > ... > u_M = 0.
    """

    name = "edm"
    PRECONDITIONINGS = ("edm", "vp", "ve", "iddpm")
    # the keys `config()` gives for each preconditioning, besides sigma_data and prediction_type
    _PRECONDITIONING_KEYS = {
        "edm": (),
        "vp": ("preconditioning", "num_train_timesteps", "vp_beta_d", "vp_beta_min"),
        "ve": ("preconditioning",),
        "iddpm": ("preconditioning", "num_train_timesteps", "iddpm_c1", "iddpm_c2"),
    }

    def __init__(
        self,
        sigma_data: float = 0.5,
        prediction_type: str = "epsilon",
        preconditioning: str = "edm",
        num_train_timesteps: int = 1000,
        vp_beta_d: float = 19.9,
        vp_beta_min: float = 0.1,
        iddpm_c1: float = 0.001,
        iddpm_c2: float = 0.008,
    ):
        super().__init__(sigma_data)
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"Unknown EDM prediction_type {prediction_type!r}: use 'epsilon' or 'v_prediction'.")
        if preconditioning not in self.PRECONDITIONINGS:
            raise ValueError(
                f"Unknown EDM preconditioning {preconditioning!r}: use one of {', '.join(self.PRECONDITIONINGS)}."
            )
        if preconditioning != "edm" and prediction_type != "epsilon":
            raise ValueError(
                f"prediction_type={prediction_type!r} only applies to preconditioning='edm'; the {preconditioning!r} "
                "wrapper's sign is fixed (c_out = -sigma for VP and iDDPM, +sigma for VE): use 'epsilon'."
            )
        if int(num_train_timesteps) < 2:
            raise ValueError(f"num_train_timesteps (M) must be at least 2, got {num_train_timesteps}.")
        if not (vp_beta_d > 0 and vp_beta_min >= 0):
            raise ValueError(f"VP needs vp_beta_d > 0 and vp_beta_min >= 0, got {vp_beta_d} and {vp_beta_min}.")
        self.prediction_type = prediction_type
        self._sign = -1.0 if prediction_type == "epsilon" else 1.0
        self.preconditioning = preconditioning
        self.num_train_timesteps = int(num_train_timesteps)
        self.vp_beta_d, self.vp_beta_min = float(vp_beta_d), float(vp_beta_min)
        self.iddpm_c1, self.iddpm_c2 = float(iddpm_c1), float(iddpm_c2)
        self.iddpm_sigmas = self._iddpm_table() if preconditioning == "iddpm" else None

    def config(self) -> dict:
        """The keyword arguments that rebuild this object; only those of its own preconditioning."""
        keys = ("sigma_data", "prediction_type", *self._PRECONDITIONING_KEYS[self.preconditioning])
        return {k: getattr(self, k) for k in keys}

    def _iddpm_table(self) -> torch.Tensor:
        """iDDPM's noise levels u_0 > ... > u_M = 0 (SPEC.md section 10): u_M = 0 and
        u_{j-1} = sqrt((u_j^2 + 1) / max(abar_{j-1} / abar_j, C_1) - 1), abar_j = sin^2(pi j / (2 M (1 + C_2)))
        (Nichol & Dhariwal's cosine schedule). Computed one level at a time in float32, as iDDPMPrecond computes (and
        stores) it, so that the nearest level is the same one; returned as float64."""
        M = self.num_train_timesteps

        def abar(j):  # float32, elementwise on a 0-d tensor
            return (0.5 * math.pi * torch.tensor(j) / M / (self.iddpm_c2 + 1)).sin() ** 2

        u = torch.zeros(M + 1, dtype=torch.float32)
        for j in range(M, 0, -1):
            u[j - 1] = ((u[j] ** 2 + 1) / (abar(j - 1) / abar(j)).clip(min=self.iddpm_c1) - 1).sqrt()
        return u.double()

    def _sigma(self, t):
        return self.sigma_data * torch.tan(t.clamp(TIME_EPS, math.pi / 2 - TIME_EPS))

    def _network_sample(self, x_t, t):
        if self.preconditioning == "edm":  # c_in x = x_t / sd
            return x_t / self.sigma_data
        if self.preconditioning == "ve":  # c_in = 1: the network sees x = x_t / cos t
            return x_t / torch.cos(t)
        # vp, iddpm: c_in x = x_t / (cos t sqrt(sigma^2 + 1)) = x_t / sqrt(cos^2 t + sd^2 sin^2 t)
        return x_t / torch.sqrt(torch.cos(t) ** 2 + (self.sigma_data * torch.sin(t)) ** 2)

    def _network_time(self, t):
        if self.preconditioning == "edm":  # c_noise = ln(sigma) / 4
            t = t.clamp(TIME_EPS, math.pi / 2 - TIME_EPS)
            return torch.log(self.sigma_data * torch.tan(t)) / 4
        sigma = self._sigma(t)
        if self.preconditioning == "ve":  # c_noise = ln(sigma / 2)
            return torch.log(sigma / 2)
        M = self.num_train_timesteps
        if self.preconditioning == "vp":  # c_noise = (M - 1) sigma_vp^-1(sigma), the VP SDE's time of sigma
            beta_d, beta_min = self.vp_beta_d, self.vp_beta_min
            tau = (torch.sqrt(beta_min**2 + 2 * beta_d * torch.log1p(sigma**2)) - beta_min) / beta_d
            return (M - 1) * tau
        # iddpm: c_noise = M - 1 - argmin_j |u_j - sigma| (the nearest level of its own table)
        table = self.iddpm_sigmas.to(device=t.device, dtype=torch.float32 if t.device.type == "mps" else torch.float64)
        index = (sigma.detach().to(table.dtype).reshape(-1, 1) - table).abs().argmin(dim=1).reshape(sigma.shape)
        return (M - 1 - index).to(t.dtype)

    def _to_f(self, raw, x_t, t):
        if self.preconditioning == "edm":
            return self._sign * raw
        if self.preconditioning == "ve":
            return -(raw + torch.sin(t) / self.sigma_data * x_t) / torch.cos(t)
        return (raw - torch.sin(t) / self.sigma_data * x_t) / torch.cos(t)

    def _from_f(self, F, x_t, t):
        if self.preconditioning == "edm":
            return self._sign * F
        if self.preconditioning == "ve":
            return -torch.cos(t) * F - torch.sin(t) / self.sigma_data * x_t
        return torch.cos(t) * F + torch.sin(t) / self.sigma_data * x_t


class FlowMatchingParameterization(Parameterization):
    """Rectified flow x_s = (1 - s) x0 + s n, network predicts u = n - x0 (SPEC.md section 2).

    s = sigma_data sin t / (cos t + sigma_data sin t), x_s = x_t / (cos t + sigma_data sin t), network time
    `timestep_scale * s` (1000 s in diffusers' `FlowMatchEulerDiscreteScheduler`). Closed form, stable on all of
    [0, pi/2]:  F = (u + (cos t - sin t / sigma_data) x_t) / (cos t + sigma_data sin t).
    """

    name = "flow_matching"

    def __init__(self, sigma_data: float = 0.5, timestep_scale: float = 1000.0):
        super().__init__(sigma_data)
        self.timestep_scale = float(timestep_scale)

    def _a(self, t):
        return torch.cos(t) + self.sigma_data * torch.sin(t)

    def flow_time(self, t) -> torch.Tensor:
        """The flow-matching time s in [0, 1] of TrigFlow time t."""
        t = torch.as_tensor(t)
        return self.sigma_data * torch.sin(t) / self._a(t)

    def _network_sample(self, x_t, t):
        return x_t / self._a(t)

    def _network_time(self, t):
        return self.timestep_scale * self.flow_time(t)

    def _to_f(self, raw, x_t, t):
        return (raw + (torch.cos(t) - torch.sin(t) / self.sigma_data) * x_t) / self._a(t)

    def _from_f(self, F, x_t, t):
        return self._a(t) * F - (torch.cos(t) - torch.sin(t) / self.sigma_data) * x_t


def make_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas=None,
) -> torch.Tensor:
    """The DDPM table abar_tau, built exactly as diffusers' `DDPMScheduler` / `DDIMScheduler` build it (float32)."""
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":

        def alpha_bar(time):  # Nichol & Dhariwal cosine schedule
            return math.cos((time + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [
                min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), 0.999)
                for i in range(num_train_timesteps)
            ],
            dtype=torch.float32,
        )
    else:
        raise ValueError(
            f"Unknown beta_schedule {beta_schedule!r}: use 'linear', 'scaled_linear' or 'squaredcos_cap_v2', "
            "or pass trained_betas."
        )
    return torch.cumprod(1.0 - betas, dim=0)


class VPParameterization(Parameterization):
    """DDPM / VP with a discrete table abar_tau (SPEC.md section 2), epsilon- or v-prediction.

    sigma_vp = sigma_data tan t; x_tau = x_t / b with b = sqrt(cos^2 t + sigma_data^2 sin^2 t); the network time is
    the fractional tau at which log(sigma_vp) of the table equals log(sigma_data tan t) (piecewise linear, clamped to
    the table). Closed forms:
        epsilon:  F = (eps - (sin t / sigma_data) x_t) / cos t
        v:        F = v / b + sin t cos t (sigma_data - 1 / sigma_data) x_t / b^2
    """

    def __init__(
        self,
        sigma_data: float = 0.5,
        prediction_type: str = "epsilon",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
    ):
        super().__init__(sigma_data)
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"Unknown VP prediction_type {prediction_type!r}: use 'epsilon' or 'v_prediction'.")
        self.prediction_type = prediction_type
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.beta_schedule = beta_schedule
        self.trained_betas = trained_betas
        self.alphas_cumprod = make_alphas_cumprod(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas
        )
        abar = self.alphas_cumprod.double()
        self.log_sigmas = 0.5 * torch.log((1 - abar) / abar)  # increasing in tau

    @property
    def name(self):
        return "vp_epsilon" if self.prediction_type == "epsilon" else "vp_v"

    def timestep_to_time(self, timestep) -> torch.Tensor:
        """TrigFlow time t of a (possibly fractional) table index tau: t = arctan(sigma_vp(tau) / sigma_data)."""
        timestep = torch.as_tensor(timestep, dtype=torch.float64)
        lo = timestep.floor().long().clamp(0, self.num_train_timesteps - 1)
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        frac = timestep - lo
        log_sigma = self.log_sigmas[lo] + frac * (self.log_sigmas[hi] - self.log_sigmas[lo])
        return torch.atan(torch.exp(log_sigma) / self.sigma_data)

    def _b(self, t):
        return torch.sqrt(torch.cos(t) ** 2 + (self.sigma_data * torch.sin(t)) ** 2)

    def _network_sample(self, x_t, t):
        return x_t / self._b(t)

    def _network_time(self, t):
        # Interpolate tau over log(sigma_vp) in float64 where the device has it (exact at the table's points).
        work = torch.float32 if t.device.type == "mps" else torch.float64
        table = self.log_sigmas.to(device=t.device, dtype=work)
        tc = t.to(work).clamp(TIME_EPS, math.pi / 2 - TIME_EPS)
        log_sigma = torch.log(self.sigma_data * torch.tan(tc))
        flat = log_sigma.detach().reshape(-1).contiguous()
        hi = torch.searchsorted(table, flat).clamp(1, len(table) - 1).reshape(log_sigma.shape)
        lo = hi - 1
        tau = lo.to(work) + (log_sigma - table[lo]) / (table[hi] - table[lo])
        return tau.clamp(0, self.num_train_timesteps - 1).to(t.dtype)

    def _to_f(self, raw, x_t, t):
        if self.prediction_type == "epsilon":
            return (raw - torch.sin(t) / self.sigma_data * x_t) / torch.cos(t)
        b = self._b(t)
        return raw / b + torch.sin(t) * torch.cos(t) * (self.sigma_data - 1 / self.sigma_data) * x_t / b**2

    def _from_f(self, F, x_t, t):
        if self.prediction_type == "epsilon":
            return torch.cos(t) * F + torch.sin(t) / self.sigma_data * x_t
        b = self._b(t)
        return b * F - torch.sin(t) * torch.cos(t) * (self.sigma_data - 1 / self.sigma_data) * x_t / b


PARAMETERIZATIONS = {
    "trigflow": (TrigFlowParameterization, {}),
    "edm": (EDMParameterization, {}),
    "flow_matching": (FlowMatchingParameterization, {}),
    "vp_epsilon": (VPParameterization, {"prediction_type": "epsilon"}),
    "vp_v": (VPParameterization, {"prediction_type": "v_prediction"}),
}


def _accepted(cls) -> list[str]:
    return [k for k in inspect.signature(cls.__init__).parameters if k != "self"]


def get_parameterization(name, **params) -> Parameterization:
    """Build a parameterization by name: "trigflow", "edm", "flow_matching", "vp_epsilon" or "vp_v".

    Args:
        name (`str` or `Parameterization`): the family; an already built object is returned unchanged.
        params: the family's own arguments (`sigma_data` for all; see each class).
    """
    if isinstance(name, Parameterization):
        if params:
            raise ValueError("Pass either a Parameterization object or a name with parameters, not both.")
        return name
    if name not in PARAMETERIZATIONS:
        raise ValueError(f"Unknown parameterization {name!r}. Choose one of: {', '.join(PARAMETERIZATIONS)}.")
    cls, fixed = PARAMETERIZATIONS[name]
    unknown = set(params) - set(_accepted(cls))
    if unknown:
        raise TypeError(f"Parameterization {name!r} does not take {sorted(unknown)}; it accepts {_accepted(cls)}.")
    for key, value in fixed.items():
        if params.get(key, value) != value:
            raise ValueError(
                f"Parameterization {name!r} fixes {key}={value!r}, got {params[key]!r}; "
                f"choose the name that matches ({', '.join(PARAMETERIZATIONS)})."
            )
    return cls(**{**params, **fixed})


def parameterization_from_config(config) -> Parameterization:
    """Build the parameterization a scheduler config names, taking from it only the keys that family uses.

    Keys set to `None` in the config fall back to the family's defaults.
    """
    name = config["parameterization"]
    if name not in PARAMETERIZATIONS:
        raise ValueError(f"Unknown parameterization {name!r}. Choose one of: {', '.join(PARAMETERIZATIONS)}.")
    cls, fixed = PARAMETERIZATIONS[name]
    params = {k: config[k] for k in _accepted(cls) if k in config and config[k] is not None and k not in fixed}
    return get_parameterization(name, **params)
