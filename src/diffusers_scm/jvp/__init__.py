"""Forward-mode derivatives through diffusers networks (SPEC.md sections 3 and 6)."""

from .attention import BACKENDS, attention, available_backends, jvp_attention, resolve_backend
from .functional import METHODS, jvp, unwrap_model
from .processors import JVPFunctionMode, float64_precision, jvp_mode


__all__ = [
    "BACKENDS",
    "METHODS",
    "JVPFunctionMode",
    "attention",
    "available_backends",
    "jvp",
    "jvp_attention",
    "jvp_mode",
    "float64_precision",
    "resolve_backend",
    "unwrap_model",
]
