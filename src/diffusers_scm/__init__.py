"""diffusers-scm: one- and two-step generators from diffusion models (sCM, TCM), inside diffusers."""

__version__ = "0.1.0.dev0"

# diffusers' pipeline loader resolves a component saved as ["diffusers_scm", ClassName] by looking up its loadable
# base classes on this module, so they are importable from here.
from diffusers import ModelMixin, SchedulerMixin  # noqa: F401

from .denoiser import TrigFlowDenoiser, call_network
from .models import DhariwalUNet2DModel, EDM2UNet2DModel, SCMUNet2DModel, SongUNet2DModel
from .parameterizations import (
    EDMParameterization,
    FlowMatchingParameterization,
    Parameterization,
    TrigFlowParameterization,
    VPParameterization,
    get_parameterization,
)
from .pipelines import SCMPipeline
from .schedulers import TrigFlowFamilyScheduler, TrigFlowODEScheduler, TrigFlowScheduler, TrigFlowSchedulerOutput


__all__ = [
    "__version__",
    "TrigFlowScheduler",
    "TrigFlowODEScheduler",
    "TrigFlowFamilyScheduler",
    "TrigFlowSchedulerOutput",
    "SCMPipeline",
    "SCMUNet2DModel",
    "EDM2UNet2DModel",
    "SongUNet2DModel",
    "DhariwalUNet2DModel",
    "TrigFlowDenoiser",
    "call_network",
    "get_parameterization",
    "Parameterization",
    "TrigFlowParameterization",
    "EDMParameterization",
    "FlowMatchingParameterization",
    "VPParameterization",
]
