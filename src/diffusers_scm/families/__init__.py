"""Text-to-image and text-to-video families, each declared once (DESIGN.md; SPEC.md section 8).

A family is a diffusers pipeline class together with what this package needs to distill and sample it: the prompt
encoding through the pipeline's own `encode_prompt` (`PromptEncoding`), the latent codec of its VAE (images or
videos in [-1, 1] to the teacher's x0 and back), the name of its network component, whether it makes videos, and how
its own pipeline samples a student (`own_sampler`). The network's call itself is its adapter (`diffusers_scm.adapters`,
chosen by the network's class). Distillation, the latent cache, validation, `SCMPipeline(prompt=...)`, evaluation and
saving read the family from here:

    family = get_family(pipe)                    # a loaded pipeline, its class, or its class name
    encoding = family.prompt_encoding(pipe)      # prompts -> the network's keyword conditioning (cond, uncond)
    codec = family.latent_codec(pipe.vae)        # images / videos in [-1, 1] <-> x0

Adding a family is one module in this package that defines its `PromptEncoding` (and, where its VAE or latent layout
needs one, its codec and adapter) and calls `register_family(Family(...))`; `docs/guides/adding-a-family.md` lists the
tests it must pass.
"""

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable


__all__ = [
    "Family",
    "FAMILIES",
    "register_family",
    "get_family",
    "family_names",
    "is_family",
    "prompt_encoding",
    "prompt_sequence_length",
]


@dataclasses.dataclass(frozen=True)
class Family:
    """
    One family of diffusers text-to-image / text-to-video pipelines.

    Attributes:
        pipeline (`str`): the diffusers pipeline class name (e.g. "StableDiffusion3Pipeline").
        encoding (`type`): its `PromptEncoding` subclass (`diffusers_scm.conditioning`).
        codec (`type`, *optional*): its latent codec class (`LatentCodec` or a subclass), default `LatentCodec`.
        network (`str`): the pipeline's network component ("transformer" or "unet").
        video (`bool`): the family makes videos (x0 of shape (B, C, F, h, w); `num_frames`).
        own_sampler (`str`): how the family's own pipeline samples a student: "sigmas" (it takes `sigmas=`, and the
            student folder carries a `FlowMatchLCMScheduler`) or "scheduler" (it only calls `set_timesteps(n)`; the
            student folder carries this package's `TrigFlowFamilyScheduler` in the family's time units); None where
            the student samples in `SCMPipeline` only.
        text_components (`tuple[str]`): the pipeline's text encoder and tokenizer components a student keeps.
        extra_components (`tuple[str]`): other components the family pipeline's constructor needs that a student
            folder keeps as they are (e.g. a `guider`).
        teacher_network (`Callable`, *optional*): `(pipeline) -> network`, the network the teacher calls where it
            is not the `network` component alone (Wan 2.2's two experts switched at a boundary timestep,
            `diffusers_scm.families.wan.TimestepExperts`). A network with a `student_network()` method gives the one
            a single-network student starts from.
    """

    pipeline: str
    encoding: type
    codec: type | None = None
    network: str = "transformer"
    video: bool = False
    own_sampler: str | None = "sigmas"
    text_components: tuple[str, ...] = ("text_encoder", "tokenizer")
    extra_components: tuple[str, ...] = ()
    teacher_network: Callable | None = None

    def prompt_encoding(self, pipeline):
        """The family's `PromptEncoding` over a loaded pipeline."""
        return self.encoding(pipeline)

    def teacher_network_of(self, pipeline):
        """The network the teacher of a loaded family pipeline calls (`teacher_network`, else its `network`
        component)."""
        if self.teacher_network is not None:
            return self.teacher_network(pipeline)
        return getattr(pipeline, self.network, None)

    def latent_codec(self, vae, sample: bool = True):
        """The family's latent codec over its VAE (`sample`: draw z from the posterior, else its mode)."""
        from ..conditioning import LatentCodec

        return (self.codec or LatentCodec)(vae, sample=sample)


FAMILIES: dict[str, Family] = {}

_loaded = False


def register_family(family: Family) -> Family:
    """Declare a family (by its pipeline class name); a later declaration of the same name replaces the earlier."""
    FAMILIES[family.pipeline] = family
    return family


def _load():
    global _loaded
    if not _loaded:
        _loaded = True
        for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):  # every module here declares some
            importlib.import_module(f"{__name__}.{module.name}")


def family_names() -> list[str]:
    """The pipeline class names of every declared family."""
    _load()
    return list(FAMILIES)


def is_family(name: str | None) -> bool:
    """Whether `name` is the pipeline class name of a declared family."""
    _load()
    return name in FAMILIES


def get_family(pipeline) -> Family:
    """
    The family of a pipeline: a loaded pipeline, its class, or its class name (a subclass of a declared pipeline
    class belongs to that family).

    Raises:
        `ValueError`: not a declared family; the error lists the declared ones.
    """
    _load()
    if isinstance(pipeline, str):
        if pipeline in FAMILIES:
            return FAMILIES[pipeline]
        classes = ()
        import diffusers

        cls = getattr(diffusers, pipeline, None)
        classes = cls.__mro__ if isinstance(cls, type) else ()
        name = pipeline
    else:
        cls = pipeline if isinstance(pipeline, type) else type(pipeline)
        classes, name = cls.__mro__, cls.__name__
    for cls in classes:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    raise ValueError(
        f"{name} is not a supported text-to-image or text-to-video family: use one of {sorted(FAMILIES)}."
    )


def prompt_encoding(pipeline):
    """The `PromptEncoding` of a family pipeline (by its class or nearest declared base class)."""
    return get_family(pipeline).prompt_encoding(pipeline)


def prompt_sequence_length(pipeline) -> int | None:
    """The `max_sequence_length` every call of this package uses for a family pipeline's prompts
    (`PromptEncoding.sequence_length`: the pipeline's default, or its long tokenizer's `model_max_length` where
    shorter); None for families without the argument (SD, SDXL)."""
    return prompt_encoding(pipeline).sequence_length()
