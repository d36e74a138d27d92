"""FSDP2 (torch's `fully_shard`) for students too large for one device: per-block sharding, full-weight gathering for
sampling and saving, and sharded checkpoints through torch.distributed.checkpoint.

Everything here reads the sharding from the parameters (DTensors), so it does not matter who applied it: accelerate
(`accelerate launch --use_fsdp --fsdp_version 2`) or `shard_module` (the scripts' `--fsdp`, which also runs on CPU
with gloo, where accelerate does not enable FSDP). The JVP pass runs on the sharded student as on any module: FSDP2's
pre-forward hooks all-gather each block's weights, and forward-mode AD goes through the gathered weights.
"""

import os

import torch
from torch import nn


__all__ = [
    "is_sharded",
    "block_class_names",
    "shard_module",
    "update_shards_before_forward",
    "full_tensors",
    "unsharded_copy",
    "save_sharded_state",
    "load_sharded_state",
    "SHARDED_STATE",
]

SHARDED_STATE = "sharded_state"  # the torch.distributed.checkpoint folder inside a checkpoint

# containers whose entries are a network's repeated blocks: each entry is one FSDP unit when the network has no
# `_no_split_modules` (diffusers' UNet2DModel, for instance)
_BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks", "blocks", "layers")
_SINGLE_BLOCKS = ("mid_block",)


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(module: nn.Module | None) -> bool:
    """Whether any parameter of `module` is sharded (a DTensor, as FSDP2 leaves them)."""
    if module is None:
        return False
    dtensor = _dtensor_type()
    return any(isinstance(p, dtensor) for p in module.parameters())


def block_class_names(network: nn.Module) -> list[str]:
    """The class names of `network`'s blocks, each of which becomes one FSDP unit: the network's `_no_split_modules`
    (diffusers and transformers models declare them), else the classes in its block lists (`down_blocks`,
    `up_blocks`, `mid_block`, `transformer_blocks`, ...)."""
    names = list(getattr(network, "_no_split_modules", None) or [])
    if names:
        return names
    for attr in _BLOCK_LISTS + _SINGLE_BLOCKS:
        child = getattr(network, attr, None)
        members = list(child) if isinstance(child, (nn.ModuleList, nn.Sequential)) else [child]
        for member in members:
            if isinstance(member, nn.Module) and type(member).__name__ not in names:
                names.append(type(member).__name__)
    return names


def shard_module(
    model: nn.Module,
    block_classes: list[str] | None = None,
    mixed_precision: str | None = None,
    reshard_after_forward: bool = True,
    extra_units: tuple = (),
):
    """Shard `model` in place with FSDP2: one unit per block (modules whose class is in `block_classes`, default
    `block_class_names` of the network inside), one per module of `extra_units` (e.g. the adaptive-weighting head),
    then the root. `mixed_precision` "bf16"/"fp16" computes in that dtype over float32 master weights (gradients
    reduced in float32). Needs an initialized process group. Returns `model`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    network = getattr(model, "inner_model", model)
    names = set(block_classes or block_class_names(network))
    if not names:
        raise ValueError(
            f"No block classes to shard in {type(network).__name__}: it declares no `_no_split_modules` and has no "
            "block lists. Name them (--fsdp_block_classes ClassA,ClassB)."
        )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision or "no")
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype is not None else None)
    found = [m for m in network.modules() if type(m).__name__ in names]
    if not found:
        raise ValueError(f"{type(network).__name__} has no module of the block classes {sorted(names)}.")
    for module in reversed(found):  # innermost first (modules() lists parents first): nested blocks are units too
        fully_shard(module, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for module in extra_units:
        fully_shard(module, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=policy)  # the root: left gathered after the forward for the backward
    update_shards_before_forward(model)
    return model


def _sharded_parameters(model: nn.Module):
    """`(module, name, sharded parameter)` of each parameter that FSDP2 manages in `model`: the sharded parameter also
    while its unit holds the gathered copy in the module's attribute (a root between its forward and backward)."""
    from torch.distributed.fsdp import FSDPModule

    seen = set()
    for unit in model.modules():
        if not isinstance(unit, FSDPModule):
            continue
        state = unit._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None) or [getattr(state, "_fsdp_param_group", None)]
        for group in [g for g in groups if g is not None]:
            for param in group.fsdp_params:
                if id(param) not in seen:
                    seen.add(id(param))
                    yield param._module_info.module, param._module_info.param_name, param.sharded_param


def _shard_updates(model: nn.Module, args, kwargs):
    """The root's pre-forward hook of `update_shards_before_forward`."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    if active is not None and active():  # torch.func forbids mutating captured tensors (the forward normalizes anyway)
        return
    for module, name, param in _sharded_parameters(model):
        update = getattr(module, "normalize_stored_weight_", None)
        if update is not None and name == "weight" and module.training and param.requires_grad:
            update(param)


def update_shards_before_forward(model: nn.Module):
    """Modules that rewrite their stored weights in a training-mode forward pass (EDM2's forced weight normalization,
    `MPConv.normalize_stored_weight_`, SPEC.md section 10) would write into FSDP2's gathered copies, which resharding
    drops: register a pre-forward hook on the sharded root `model` that applies the update to the shards, before any
    unit is gathered (the modules go on updating the gathered copies they compute with). It updates the trainable
    weights of such modules in training mode (those the forward pass calls; a frozen head that it does not call,
    EDM2's uncertainty head in distillation, stays as it is). Nothing is registered when `model` holds no such
    module. Returns `model`."""
    if any(hasattr(m, "normalize_stored_weight_") for m in model.modules()):
        model.register_forward_pre_hook(_shard_updates, prepend=True, with_kwargs=True)  # before FSDP's gathering
    return model


def full_tensors(tensors: dict, to_cpu: bool = True) -> dict:
    """Gather a dict of tensors (DTensors are all-gathered one at a time; a collective, every process must call it).
    Returns the full tensors on the main process (rank 0) and an empty dict elsewhere; plain tensors pass through."""
    import torch.distributed as dist

    dtensor = _dtensor_type()
    main = not dist.is_initialized() or dist.get_rank() == 0
    out = {}
    for key, value in tensors.items():
        full = value.full_tensor() if isinstance(value, dtensor) else value
        if main:
            out[key] = full.detach().cpu() if to_cpu else full.detach()
        del full
    return out


def _original_class(module: nn.Module) -> type:
    """The class a module had before `fully_shard` (which swaps in an `FSDP<Class>` subclass)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def unsharded_copy(network: nn.Module, state: dict | None = None) -> nn.Module | None:
    """A plain (unsharded) copy of a sharded diffusers network holding the full weights `state` (default: the
    network's own), built from its config on the main process; None on the other processes. A collective when
    `state` is not given."""
    if not hasattr(network, "config"):
        raise TypeError(
            f"{type(network).__name__} has no config to rebuild it unsharded from: FSDP students must be diffusers "
            "models (ModelMixin/ConfigMixin)."
        )
    if state is None:
        state = full_tensors(network.state_dict())
    if not state:
        return None
    cls = _original_class(network)
    copy = cls.from_config(dict(network.config))
    copy.load_state_dict(state)
    return copy.eval()


def _optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer holds the torch one


def save_sharded_state(folder: str, model: nn.Module, optimizer, ema=None):
    """Write the sharded model, optimizer and EMA states into `folder/sharded_state` with torch.distributed.checkpoint
    (each process writes its shards; a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, _optimizer(optimizer))
    state = {"model": model_state, "optimizer": optimizer_state}
    if ema is not None:
        state["ema"] = ema.shadow
    dcp.save(state, checkpoint_id=os.path.join(folder, SHARDED_STATE))


def load_sharded_state(folder: str, model: nn.Module, optimizer, ema=None):
    """Restore what `save_sharded_state` wrote into the (identically sharded) model, optimizer and EMA."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    torch_optimizer = _optimizer(optimizer)
    model_state, optimizer_state = get_state_dict(model, torch_optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    if ema is not None:
        state["ema"] = ema.shadow
    dcp.load(state, checkpoint_id=os.path.join(folder, SHARDED_STATE))
    set_state_dict(model, torch_optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
