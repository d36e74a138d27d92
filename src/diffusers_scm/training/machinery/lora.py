"""LoRA students (SPEC.md section 9): W + B A on chosen linear layers of the teacher's own network, B zero-initialized
(the student starts as the teacher), through peft by diffusers' `add_adapter`. The teacher is the same network with the
adapters switched off, so one copy of the base weights is in memory.

    network = teacher.inner_model
    add_lora(network, rank=16)                                 # only the adapters require gradients
    student = TrigFlowDenoiser(network, teacher.parameterization, sigma_data=sd)
    teacher = BaseModelDenoiser(network, teacher.parameterization, sigma_data=sd)   # adapters off in its calls
"""

import contextlib

import torch

from ...denoiser import TrigFlowDenoiser


__all__ = [
    "add_lora",
    "default_lora_targets",
    "BaseModelDenoiser",
    "adapters_disabled",
    "lora_parameters",
    "save_lora",
    "fuse_lora",
]

# attention projections of diffusers' attention modules (joint attention adds the add_*_proj of the text stream)
_ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def default_lora_targets(network) -> list[str]:
    """The attention projections that `network` has (the targets of diffusers' LoRA training scripts)."""
    names = {name for name, _ in network.named_modules()}
    found = [t for t in _ATTENTION_PROJECTIONS if any(n == t or n.endswith("." + t) for n in names)]
    if not found:
        raise ValueError(
            f"{type(network).__name__} has none of the default LoRA targets {_ATTENTION_PROJECTIONS}: pass "
            "--lora_target_modules (names of its linear layers)."
        )
    return found


def add_lora(network, rank: int, alpha: float | None = None, target_modules: list[str] | None = None):
    """Freeze `network` and add a LoRA adapter (rank `rank`, scale alpha / rank, B = 0) on `target_modules` (default:
    its attention projections) with diffusers' `add_adapter`; the adapter's parameters are float32 and trainable.
    Returns the target modules."""
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise ImportError("LoRA students need peft: `pip install peft` (or the `training` extra).") from e
    if not hasattr(network, "add_adapter"):
        raise ValueError(f"{type(network).__name__} has no `add_adapter` (diffusers' PeftAdapterMixin): no LoRA.")
    targets = list(target_modules) if target_modules else default_lora_targets(network)
    network.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets)
    network.add_adapter(config)
    for p in lora_parameters(network):
        p.data = p.data.float()  # float32 master weights for the adapter, whatever the base dtype
        p.requires_grad_(True)
    return targets


def lora_parameters(network) -> list[torch.nn.Parameter]:
    """The adapter's parameters (`lora_A`, `lora_B`)."""
    return [p for name, p in network.named_parameters() if "lora_" in name]


@contextlib.contextmanager
def adapters_disabled(network):
    """`network` without its adapters for the block (the base model: the teacher of a LoRA student)."""
    network.disable_adapters()
    try:
        yield
    finally:
        network.enable_adapters()


class BaseModelDenoiser(TrigFlowDenoiser):
    """The teacher of a LoRA student: the student's own network with its adapters switched off in every call, so the
    base weights exist once (SPEC.md section 9)."""

    def raw_output(self, x_t, t, **conditioning):
        with adapters_disabled(self.inner_model):
            return super().raw_output(x_t, t, **conditioning)


def save_lora(network, folder: str, family_pipeline: str | None = None) -> str:
    """Save the adapter in diffusers' LoRA format: through the family pipeline's `save_lora_weights` (so
    `FamilyPipeline.load_lora_weights(folder)` loads it), else (no family, or a family pipeline without a LoRA
    loader, e.g. HunyuanVideo15Pipeline) the network's `save_lora_adapter` (`network.load_lora_adapter(folder)` loads
    it, `weight_name="pytorch_lora_weights.safetensors", prefix=None`). Returns the file."""
    import os

    import diffusers
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(network)
    pipeline_class = getattr(diffusers, family_pipeline, None) if family_pipeline is not None else None
    if pipeline_class is not None and hasattr(pipeline_class, "save_lora_weights"):
        component = "unet" if "UNet" in type(network).__name__ else "transformer"
        pipeline_class.save_lora_weights(folder, **{f"{component}_lora_layers": layers})
    else:
        network.save_lora_adapter(folder)
    return os.path.join(folder, "pytorch_lora_weights.safetensors")


def fuse_lora(network):
    """`network` with its adapter merged into the base weights (W + scale B A) and removed: a plain diffusers network."""
    network.fuse_lora(lora_scale=1.0)
    network.unload_lora()
    return network
