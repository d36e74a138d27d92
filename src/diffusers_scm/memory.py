"""Memory planner for sCD distillation (SPEC.md section 9): per-GPU memory by part, and whether it fits.

    python -m diffusers_scm.memory --model CONFIG_OR_FOLDER --method scd --gpus 8 --gpu_memory_gb 80 \
        --mode ddp|fsdp|lora [--lora_rank 64] [--gradient_checkpointing] [--resolution 1024]
    python -m diffusers_scm.memory --model img512-xl --gpus 8 --batch_size 32      # an EDM2 preset by name
    python -m diffusers_scm.memory --list                                          # the presets and their sizes

The network is built on PyTorch's meta device from its diffusers config (nothing is allocated or downloaded), which
gives the exact parameter count and the shapes the activation estimate needs. `--model` also takes the name of a
published EDM2 size (`MODELS`: img512-xs ... img512-xxl on 4x64x64 latents, img64-s ... img64-xl on 64x64 pixels,
`EDM2UNet2DModel`, SPEC.md section 10), and configs of the package's own networks (`_class_name` EDM2UNet2DModel,
SongUNet2DModel, DhariwalUNet2DModel, SCMUNet2DModel).

Per parameter (SPEC.md section 9): student weights 4 bytes (float32 master), gradients 4, Adam's moments 8, EMA 4,
frozen teacher 2 (bf16). FSDP2 divides the student's share (and a sharded teacher's) by the number of GPUs and adds
the all-gather buffers of two blocks; a LoRA student keeps the base weights once (the teacher: 2 bytes per parameter)
and 20 bytes per adapter parameter. Activations of the gradient pass: `activation_factor` values of `act_bytes` per
token per hidden unit per block, or, with gradient checkpointing, each block's input plus one block's activations. The
default 48 is measured (`benchmarks/bench_memory.py`: 40-56 for DiT, PixArt, SD3, Flux and Qwen-Image blocks): more
than the 17 of a plain GPT block (Korthikanti et al. 2022, without the attention matrix), since MM-DiT blocks carry
two streams and adaptive-norm modulations. The JVP and teacher passes run without gradients: their peak is a few tensors of one block.

Convolutional UNets (EDM2, EDM's SongUNet and ADM, diffusers' UNet2DModel) have no single width and token count: their
gradient pass is measured instead, by running the network once on PyTorch's fake tensors (shapes only, no memory) at
the batch size and sample size of the plan, under bf16 autocast for `act_bytes` 2, and adding up the bytes that
autograd saves for the backward pass (for EDM2 this includes the normalized copy of every weight that each forward
pass makes, 4-8 bytes per parameter). With gradient checkpointing: what the checkpointed pass saves, plus the largest
block's own activations (recomputed one block at a time). The JVP and teacher passes: primal and tangent of the input
and output of the widest block.
"""

import argparse
import dataclasses
import json
import os

import torch


__all__ = ["MemoryPlan", "plan_memory", "count_parameters", "model_config", "list_models", "MODELS", "main"]

GB = 1024**3
_LAYER_KEYS = ("num_layers", "num_single_layers", "num_mmdit_layers", "num_single_dit_layers", "num_refiner_layers")
_PACKED = ("FluxTransformer2DModel", "ChromaTransformer2DModel", "QwenImageTransformer2DModel")
_TEXT_TOKENS = {  # the families' default prompt lengths
    "SD3Transformer2DModel": 333,  # 77 CLIP + 256 T5
    "FluxTransformer2DModel": 512,
    "ChromaTransformer2DModel": 512,
    "QwenImageTransformer2DModel": 512,
    "SanaTransformer2DModel": 300,
    "PixArtTransformer2DModel": 300,
    "WanTransformer3DModel": 512,
}


@dataclasses.dataclass
class MemoryPlan:
    """Per-GPU bytes by part (`parts`), their `total`, the GPU's memory and whether the plan fits."""

    parts: dict
    gpu_memory: float
    parameters: int
    trainable: int
    tokens: int

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory

    def table(self) -> str:
        rows = [f"{'part':34} {'GB':>9}"]
        rows += [f"{name:34} {value / GB:>9.2f}" for name, value in self.parts.items()]
        rows.append(f"{'total':34} {self.total / GB:>9.2f}")
        verdict = "fits" if self.fits else "does NOT fit"
        rows.append(f"{verdict} in {self.gpu_memory / GB:.0f} GB per GPU")
        return "\n".join(rows)


def _edm2_models() -> dict:
    from .models.unet_edm2 import EDM2_PRESETS

    return {name: {"_class_name": "EDM2UNet2DModel", **preset} for name, preset in EDM2_PRESETS.items()}


# the networks `--model` takes by name: EDM2's published sizes (SPEC.md section 10)
MODELS = _edm2_models()


def model_config(model: str | dict) -> dict:
    """A network config: a dict as is, the name of one of `MODELS` (an EDM2 preset), or a config.json (or a folder
    holding one)."""
    if isinstance(model, dict):
        return model
    if model in MODELS:
        return dict(MODELS[model])
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--model {model}: neither a config file nor a known model name ({', '.join(MODELS)}; --list shows them)."
        )
    with open(path) as f:
        return json.load(f)


def _network_class(config: dict):
    """The config's class: one of the package's networks (EDM2UNet2DModel, SongUNet2DModel, ...) or of diffusers."""
    import diffusers

    from . import models

    name = config.get("_class_name", "")
    cls = getattr(models, name, None) or getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ValueError(
            f"The config's _class_name {config.get('_class_name')!r} is not a diffusers network class: pass a "
            "diffusers config.json (a network folder's, or a pipeline's transformer/ or unet/ subfolder), or a "
            "diffusers_scm network's (EDM2UNet2DModel, SongUNet2DModel, DhariwalUNet2DModel, SCMUNet2DModel)."
        )
    return cls


def _build_meta(config: dict):
    cls = _network_class(config)
    with torch.device("meta"):
        return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def list_models() -> list[tuple[str, int, str]]:
    """`(name, parameters, shape)` of every model of `MODELS`, each built on the meta device."""
    rows = []
    for name, config in MODELS.items():
        side, channels = config["sample_size"], config["in_channels"]
        rows.append((name, count_parameters(_build_meta(config)), f"{channels}x{side}x{side}"))
    return rows


def _is_transformer(config: dict) -> bool:
    """Whether the activation formula applies: a network with one width (heads x head dim, or a hidden size)."""
    try:
        _hidden(config)
    except ValueError:
        return False
    return config.get("_class_name") not in ("UNet2DModel", "UNet2DConditionModel", "SCMUNet2DModel")


def _saved_bytes(network, sample, timestep, act_bytes: int, blocks) -> tuple[int, int, int]:
    """One forward pass of `network` with gradients (fake tensors): the bytes autograd saves for backward, the most
    that one of `blocks` saves, and the largest block output (elements)."""
    seen, total, per_block, widest = set(), [0], [0], [0]

    def pack(tensor):
        if id(tensor) not in seen:  # a tensor saved by several operations is stored once
            seen.add(id(tensor))
            total[0] += tensor.numel() * tensor.element_size()
        return tensor

    def before(module, args):
        module._saved_before = total[0]

    def after(module, args, output):
        per_block[0] = max(per_block[0], total[0] - module._saved_before)
        widest[0] = max(widest[0], output.numel())

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(before), b.register_forward_hook(after))]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=act_bytes == 2)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            network(sample, timestep)
    finally:
        for h in handles:
            h.remove()
    return total[0], per_block[0], widest[0]


def _measure_unet(config: dict, batch_size: int, side: int, act_bytes: int, gradient_checkpointing: bool) -> dict:
    """The gradient pass of a convolutional network measured on fake tensors (see the module docstring): `stored`
    (bytes saved for backward), `peak_block` (one block's, recomputed under checkpointing), `widest` (elements of the
    largest block output) and `blocks` (the number of FSDP units)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cls = _network_class(config)
    with FakeTensorMode():  # shapes and dtypes only: nothing is allocated
        network = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")}).train()
        units = set(getattr(network, "_no_split_modules", None) or ())
        blocks = [m for m in network.modules() if type(m).__name__ in units]
        sample = torch.randn(batch_size, config.get("in_channels", 3), side, side)
        timestep = torch.rand(batch_size)
        stored, peak_block, widest = _saved_bytes(network, sample, timestep, act_bytes, blocks)
        if gradient_checkpointing and getattr(network, "_supports_gradient_checkpointing", False):
            network.enable_gradient_checkpointing()
            stored = _saved_bytes(network, sample, timestep, act_bytes, [])[0] + peak_block
    return {"stored": stored, "peak_block": peak_block, "widest": widest, "blocks": max(1, len(blocks))}


def count_parameters(network) -> int:
    return sum(p.numel() for p in network.parameters())


def _lora_parameters(network, rank: int) -> int:
    """rank (in + out) per attention projection (the default LoRA targets)."""
    from .training.machinery.lora import default_lora_targets

    targets = default_lora_targets(network)
    total = 0
    for name, module in network.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            total += rank * (module.in_features + module.out_features)
    return total


def _hidden(config: dict) -> int:
    heads, dim = config.get("num_attention_heads"), config.get("attention_head_dim")
    if heads and dim:
        return int(heads * dim)
    for key in ("hidden_size", "inner_dim", "cross_attention_dim"):
        if config.get(key):
            return int(config[key])
    raise ValueError("Cannot tell the network's width from its config (num_attention_heads x attention_head_dim).")


def _image_tokens(config: dict, resolution: int, vae_scale_factor: int, frames: int) -> int:
    patch = config.get("patch_size") or 1
    patch = patch[-1] if isinstance(patch, (list, tuple)) else patch
    if config.get("_class_name") in _PACKED:
        patch = 2 if config.get("_class_name") != "QwenImageTransformer2DModel" else patch
    side = resolution // vae_scale_factor // patch
    return side * side * max(1, frames)


def plan_memory(
    config: dict | str,
    method: str = "scd",
    gpus: int = 1,
    gpu_memory_gb: float = 80,
    mode: str = "ddp",
    lora_rank: int = 64,
    gradient_checkpointing: bool = False,
    batch_size: int = 1,
    resolution: int | None = None,
    vae_scale_factor: int = 8,
    frames: int = 1,
    text_tokens: int | None = None,
    act_bytes: int = 2,
    teacher_bytes: int = 2,
    activation_factor: float = 48.0,
    overhead_gb: float = 1.0,
    teacher_sharded: bool = True,
) -> MemoryPlan:
    """
    Per-GPU memory of sCD (or sCT: no teacher) training by part (see the module docstring).

    Args:
        config (`dict` or `str`): a diffusers network config, the path of a config.json or a network folder, or the
            name of one of `MODELS` (EDM2's img512-xs ... img512-xxl, img64-s ... img64-xl).
        method (`str`): "scd" (a frozen teacher) or "sct" (none).
        gpus (`int`), gpu_memory_gb (`float`): the machine.
        mode (`str`): "ddp" (replicated), "fsdp" (FSDP2: student, EMA and optimizer sharded) or "lora".
        lora_rank (`int`): adapter rank for "lora".
        gradient_checkpointing (`bool`): store block inputs only in the gradient pass.
        batch_size (`int`): per GPU.
        resolution (`int`, *optional*): image size in pixels; `vae_scale_factor`, `frames` (video) give the latent
            tokens. Default: 1024 for transformers; a UNet's own `sample_size` (e.g. the 64x64 latents of EDM2's
            img512 models), where the sample is `resolution // vae_scale_factor` for latent networks (4 input
            channels) and `resolution` for pixel ones.
        text_tokens (`int`, *optional*): prompt tokens joined to the image tokens (default: the family's).
        act_bytes (`int`): bytes per activation (2 for bf16 autocast, 4 for float32).
        teacher_bytes (`int`): bytes per frozen teacher (and LoRA base) parameter.
        activation_factor (`float`): stored values per token per hidden unit per block in the gradient pass.
        overhead_gb (`float`): CUDA context and allocator reserve.
        teacher_sharded (`bool`): with FSDP, shard the frozen teacher as well.
    """
    if mode not in ("ddp", "fsdp", "lora"):
        raise ValueError(f"Unknown mode {mode!r}: use ddp, fsdp or lora.")
    if method not in ("scd", "sct", "cd", "ct", "tcm"):
        raise ValueError(f"Unknown method {method!r}.")
    config = model_config(config)
    network = _build_meta(config)
    params = count_parameters(network)
    name = config.get("_class_name")
    unet = None
    if _is_transformer(config):
        width = _hidden(config)
        layers = sum(int(config.get(k) or 0) for k in _LAYER_KEYS) or 1
        text = _TEXT_TOKENS.get(name, 0) if text_tokens is None else text_tokens
        tokens = _image_tokens(config, resolution or 1024, vae_scale_factor, frames) + text
    else:  # a UNet: its gradient pass measured on fake tensors
        side = config.get("sample_size") or 64
        side = side[0] if isinstance(side, (list, tuple)) else side
        if resolution is not None:
            side = resolution // vae_scale_factor if config.get("in_channels") == 4 else resolution
        unet = _measure_unet(config, batch_size, side, act_bytes, gradient_checkpointing)
        layers, tokens = unet["blocks"], side * side
    has_teacher = method in ("scd", "cd", "tcm")
    shard = gpus if mode == "fsdp" else 1
    parts = {}
    if mode == "lora":
        trainable = _lora_parameters(network, lora_rank)
        parts["base weights (student = teacher)"] = params * teacher_bytes
        parts["adapter weights (float32)"] = trainable * 4
        parts["adapter gradients"] = trainable * 4
        parts["adapter Adam moments"] = trainable * 8
        parts["adapter EMA"] = trainable * 4
    else:
        trainable = params
        parts["student weights (float32)"] = params * 4 / shard
        parts["gradients"] = params * 4 / shard
        parts["Adam moments"] = params * 8 / shard
        parts["EMA"] = params * 4 / shard
        if has_teacher:
            parts["frozen teacher"] = params * teacher_bytes / (shard if teacher_sharded else 1)
        if mode == "fsdp":  # two blocks gathered at a time (prefetch), 16-bit
            parts["FSDP all-gather buffers"] = 2 * params / layers * 2
    if unet is not None:  # measured: what autograd saves; the JVP: primal and tangent of the widest block's in and out
        parts["activations, gradient pass"] = unet["stored"]
        parts["JVP / teacher pass peak"] = 2 * 2 * unet["widest"] * act_bytes
    else:
        per_block = activation_factor * tokens * width * act_bytes * batch_size
        if gradient_checkpointing:
            parts["activations, gradient pass"] = layers * tokens * width * act_bytes * batch_size + per_block
        else:
            parts["activations, gradient pass"] = layers * per_block
        # the JVP and teacher passes: primal and tangent of a block's widest tensors (the MLP's 4x width)
        parts["JVP / teacher pass peak"] = 2 * 2 * tokens * 4 * width * act_bytes * batch_size
    parts["CUDA context and allocator"] = overhead_gb * GB
    return MemoryPlan(parts, gpu_memory_gb * GB, params, trainable, tokens)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m diffusers_scm.memory", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default=None, help="a network config.json (or its folder), or a model name (--list: EDM2 presets)"
    )
    p.add_argument("--list", action="store_true", help="list the models --model takes by name, with their sizes")
    p.add_argument("--method", default="scd", choices=["scd", "sct", "cd", "ct", "tcm"])
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--gpu_memory_gb", type=float, default=80)
    p.add_argument("--mode", default="ddp", choices=["ddp", "fsdp", "lora"])
    p.add_argument("--lora_rank", type=int, default=64)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--batch_size", type=int, default=1, help="per GPU")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: 1024; a UNet: its sample size)")
    p.add_argument("--frames", type=int, default=1, help="latent frames (video)")
    p.add_argument("--text_tokens", type=int, default=None)
    args = p.parse_args(argv)
    if args.list:
        print(f"{'model':12} {'parameters':>12}  sample   network")
        for name, count, shape in list_models():
            print(f"{name:12} {count / 1e6:>11.1f}M  {shape:8} {MODELS[name]['_class_name']}")
        return None
    if args.model is None:
        p.error("--model is required (a config file or a model name; --list shows the names)")
    plan = plan_memory(
        args.model,
        args.method,
        args.gpus,
        args.gpu_memory_gb,
        args.mode,
        args.lora_rank,
        args.gradient_checkpointing,
        args.batch_size,
        args.resolution,
        frames=args.frames,
        text_tokens=args.text_tokens,
    )
    print(
        f"{os.path.basename(args.model)}: {plan.parameters / 1e9:.2f}B parameters ({plan.trainable / 1e6:.1f}M "
        f"trainable), {plan.tokens} tokens, {args.mode}, {args.gpus} GPU(s), batch {args.batch_size} per GPU"
    )
    print(plan.table())
    return plan


if __name__ == "__main__":
    main()
