"""Forward-mode derivatives through diffusers networks (SPEC.md sections 3 and 6)."""

from .attention import BACKENDS, attention, available_backends, jvp_attention, resolve_backend
from .functional import METHODS, jvp, unwrap_model
from .processors import SUPPORTED_PROCESSORS, JVPAttnProcessor, jvp_mode


__all__ = [
    "BACKENDS",
    "METHODS",
    "SUPPORTED_PROCESSORS",
    "JVPAttnProcessor",
    "attention",
    "available_backends",
    "jvp",
    "jvp_attention",
    "jvp_mode",
    "resolve_backend",
    "unwrap_model",
]
