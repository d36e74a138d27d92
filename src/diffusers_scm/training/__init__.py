"""Training: sCD/sCT losses, time proposals, EMA, the adaptive-weighting head, teacher loading (SPEC.md section 3)."""

from .ema import ConstantDecayEMA, PowerFunctionEMA, make_ema, sigma_rel_to_gamma
from .logvar import LogVarHead
from .losses import SCMLoss, TrigFlowDiffusionLoss, null_class_conditioning
from .teacher import infer_parameterization, load_teacher
from .time_proposals import clamp_times, lognormal_times


__all__ = [
    "SCMLoss",
    "TrigFlowDiffusionLoss",
    "LogVarHead",
    "PowerFunctionEMA",
    "ConstantDecayEMA",
    "make_ema",
    "sigma_rel_to_gamma",
    "lognormal_times",
    "clamp_times",
    "load_teacher",
    "infer_parameterization",
    "null_class_conditioning",
]
