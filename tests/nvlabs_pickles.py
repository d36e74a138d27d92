"""Pickles in the layout of NVlabs' `torch_utils.persistence` (EDM, EDM2), written from our networks, for the tests of
`diffusers_scm.convert` (SPEC.md section 10).

What an official checkpoint holds (read with `pickletools.dis`): a `dict` (EDM) or a `dnnlib.util.EasyDict` (EDM2) of
persistent objects, each stored as `torch_utils.persistence._reconstruct_persistent_obj(meta)` with
`meta = dict(type="class", version=6, module_src=..., class_name=..., state=...)`; `state` is the module's
`__dict__` (`_parameters`, `_buffers` as OrderedDicts of tensors, `_modules`, hooks, `_init_args`, `_init_kwargs`,
plain attributes). Tensors are `torch._utils._rebuild_parameter` / `_rebuild_tensor_v2` of storages stored as
`torch.storage._load_from_bytes(bytes)`; `torch.nn.ModuleDict` is a plain object (NEWOBJ, then BUILD); init kwargs hold
numpy scalars (`numpy.core.multiarray.scalar`), EDM2's encoder numpy arrays.

`NVlabsPickler` writes globals that do not exist here (`torch_utils.*`, `dnnlib.*`, or a forbidden `os.system`) by
name, through stand-in classes carrying `_pickle_as = (module, name)`; the tensors go through torch's own reducers,
so their layout is torch's. Nothing here imports NVlabs' code.
"""

import collections
import copyreg
import math
import pickle

import numpy as np
import torch

from diffusers_scm.models import DhariwalUNet2DModel, EDM2UNet2DModel, SongUNet2DModel
from diffusers_scm.models.unet_edm2 import EDM2Block


PERSISTENCE_VERSION = 6
EDM2_CLASSES = (EDM2UNet2DModel, EDM2Block)
# Our module classes -> NVlabs' (training/networks.py, training/networks_edm2.py)
NVLABS_CLASS_NAMES = {
    "SongUNet2DModel": "SongUNet",
    "DhariwalUNet2DModel": "DhariwalUNet",
    "EDM2UNet2DModel": "UNet",
    "EDMLinear": "Linear",
    "EDMConv2d": "Conv2d",
    "GroupNorm": "GroupNorm",
    "UNetBlock": "UNetBlock",
    "PositionalEmbedding": "PositionalEmbedding",
    "FourierEmbedding": "FourierEmbedding",
    "MPFourier": "MPFourier",
    "MPConv": "MPConv",
    "EDM2Block": "Block",
}
# Our config names -> NVlabs' init kwargs
NVLABS_KWARG_NAMES = {
    "sample_size": "img_resolution",
    "num_classes": "label_dim",
    "attention_resolutions": "attn_resolutions",
}
DEFAULT_SRC = "# stand-in for the stored source of training/networks.py; never executed by the converter\n"

_foreign: dict = {}


class _Plain:
    """An object pickled as NEWOBJ of its (foreign) class, then BUILD of its state: how pickle stores a plain torch
    module such as `torch.nn.ModuleDict`."""

    def __init__(self, state: dict):
        self._state = state

    def __reduce_ex__(self, protocol):
        return copyreg.__newobj__, (type(self),), self._state


def foreign_class(module: str, name: str, plain: bool = False) -> type:
    """A stand-in class that `NVlabsPickler` writes as the global `module.name` (callable, as REDUCE needs)."""
    key = (module, name, plain)
    if key not in _foreign:
        bases = (_Plain,) if plain else ()
        _foreign[key] = type(name, bases, {"_pickle_as": (module, name)})
    return _foreign[key]


class Call:
    """`module.name(*args)` in the pickle (REDUCE of a foreign global): e.g. a forbidden `os.system("...")`."""

    def __init__(self, module: str, name: str, *args):
        self.func, self.args = foreign_class(module, name), args

    def __reduce__(self):
        return self.func, self.args


class EasyDict(dict):
    """`dnnlib.util.EasyDict` as NVlabs pickles it (a dict subclass: NEWOBJ, then SETITEMS)."""

    _pickle_as = ("dnnlib.util", "EasyDict")


class Persistent:
    """An object of an NVlabs `@persistent_class`: `_reconstruct_persistent_obj(meta)` in the pickle.

    Args:
        class_name (`str`): the class's name in its module.
        state (`dict`): the object's `__dict__`.
        module_src (`str`): the stored source of the class's module (executed by NVlabs' loader, never by ours).
    """

    def __init__(self, class_name: str, state: dict, module_src: str = DEFAULT_SRC):
        self.class_name, self.state, self.module_src = class_name, state, module_src

    def __reduce__(self):
        meta = {
            "type": "class",
            "version": PERSISTENCE_VERSION,
            "module_src": self.module_src,
            "class_name": self.class_name,
            "state": self.state,
        }
        return foreign_class("torch_utils.persistence", "_reconstruct_persistent_obj"), (meta,)


class NVlabsPickler(pickle._Pickler):
    """The pure-Python pickler, writing stand-in classes by their `_pickle_as` name and, with `numpy_module`,
    numpy's `numpy._core` globals under that module name ("numpy.core" as numpy 1.x wrote them)."""

    def __init__(self, file, protocol: int = 4, numpy_module: str | None = "numpy.core"):
        super().__init__(file, protocol=protocol)
        self.numpy_module = numpy_module

    def save_global(self, obj, name=None):
        target = getattr(obj, "_pickle_as", None) if isinstance(obj, type) else None
        module = getattr(obj, "__module__", "") or ""
        if target is None and self.numpy_module and module.startswith("numpy._core"):
            target = (self.numpy_module + module[len("numpy._core") :], name or obj.__qualname__)
        if target is None:
            return super().save_global(obj, name)
        if self.proto >= 4:
            self.save(target[0])
            self.save(target[1])
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{target[0]}\n{target[1]}\n".encode("utf-8"))
        self.memoize(obj)


def write_pickle(path, data, protocol: int = 4, numpy_module: str | None = "numpy.core"):
    """Pickle `data` (built from `Persistent`, `EasyDict`, tensors, ...) to `path` in NVlabs' layout."""
    with open(path, "wb") as f:
        NVlabsPickler(f, protocol=protocol, numpy_module=numpy_module).dump(data)


# ---- our modules as NVlabs' persistent objects ----------------------------------------------------------------------


def _hooks() -> dict:
    names = ["_backward_hooks", "_forward_hooks", "_forward_pre_hooks", "_state_dict_hooks"]
    return {n: collections.OrderedDict() for n in [*names, "_load_state_dict_pre_hooks"]}


def module_state(module: torch.nn.Module, children: dict, dtype=None, init_kwargs=None, attributes=None) -> dict:
    """A module's `__dict__` as `nn.Module` pickles it: parameters (as `Parameter`s without gradients), buffers,
    the given children, hooks, plain attributes; `_init_args` / `_init_kwargs` for persistent objects."""

    def cast(t):
        return t.detach().to(dtype) if dtype is not None and t.is_floating_point() else t.detach()

    def nvlabs_shape(k, v):  # NVlabs' EDM2 gains are 0-dim (torch.zeros([])); ours have shape (1,)
        return v.reshape(()) if k in ("emb_gain", "out_gain") and isinstance(module, EDM2_CLASSES) else v

    params = collections.OrderedDict(
        (k, None if v is None else torch.nn.Parameter(cast(nvlabs_shape(k, v)), requires_grad=False))
        for k, v in module._parameters.items()
    )
    buffers = collections.OrderedDict((k, None if v is None else cast(v)) for k, v in module._buffers.items())
    plain = {k: v for k, v in vars(module).items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))}
    state = {
        "training": False,
        "_parameters": params,
        "_buffers": buffers,
        "_non_persistent_buffers_set": set(),
        **_hooks(),
        "_modules": collections.OrderedDict(children),
        **plain,
        **(attributes or {}),
    }
    if init_kwargs is not None:
        state.update(_init_args=(), _init_kwargs=init_kwargs)
    return state


def to_nvlabs(module: torch.nn.Module, module_src: str = DEFAULT_SRC, dtype=None, skip=(), init_kwargs=None):
    """Our module tree as NVlabs' objects: persistent records for their classes, plain `ModuleDict`s."""
    children = {
        name: to_nvlabs(child, module_src, dtype)
        for name, child in module.named_children()
        if name not in skip and child is not None
    }
    cls = type(module).__name__
    if isinstance(module, torch.nn.ModuleDict):
        return foreign_class("torch.nn.modules.container", "ModuleDict", plain=True)(module_state(module, children))
    if cls not in NVLABS_CLASS_NAMES:
        raise TypeError(f"No NVlabs class for {cls}.")
    if init_kwargs is None:  # numpy values in the layers' kwargs, as NVlabs' init dicts hold them
        init_kwargs = {"init_weight": np.float64(math.sqrt(1 / 3)), "channels": np.int64(8)}
    state = module_state(module, children, dtype, init_kwargs=init_kwargs)
    return Persistent(NVLABS_CLASS_NAMES[cls], state, module_src)


def nvlabs_network_kwargs(network) -> dict:
    """The init kwargs NVlabs' SongUNet / DhariwalUNet / UNet was built with, from our network's config."""
    config = {k: v for k, v in network.config.items() if not k.startswith("_")}
    kwargs = {NVLABS_KWARG_NAMES.get(k, k): v for k, v in config.items()}
    if isinstance(network, EDM2UNet2DModel):  # UNet(img_resolution, img_channels, label_dim, ...), no out_channels
        kwargs["img_channels"] = kwargs.pop("in_channels")
        kwargs.pop("out_channels", None)
        kwargs.pop("logvar_channels", None)
    kwargs["dropout"] = np.float64(kwargs["dropout"])  # a numpy scalar in the network's kwargs
    return kwargs


def iddpm_table(M: int = 1000, C_1: float = 0.001, C_2: float = 0.008) -> torch.Tensor:
    """iDDPM's levels u_0 > ... > u_M = 0 as its wrapper computes them (float32, one level at a time; SPEC.md
    section 10): u_{j-1} = sqrt((u_j^2 + 1) / max(abar_{j-1} / abar_j, C_1) - 1),
    abar_j = sin^2(pi j / (2 M (1 + C_2)))."""
    u = torch.zeros(M + 1)
    for j in range(M, 0, -1):
        lo, hi = (torch.sin(torch.tensor(i) * (0.5 * math.pi) / M / (1 + C_2)) ** 2 for i in (j - 1, j))
        u[j - 1] = torch.sqrt((u[j] * u[j] + 1) / torch.clamp(lo / hi, min=C_1) - 1)
    return u


# The wrappers' constants as NVlabs' classes store them (attributes of the wrapper)
PRECOND_ATTRIBUTES = {
    "EDMPrecond": {"sigma_min": 0.0, "sigma_max": math.inf, "sigma_data": 0.5},
    "Precond": {"sigma_data": 0.5},
    "VPPrecond": {"beta_d": 19.9, "beta_min": 0.1, "M": 1000, "epsilon_t": 1e-5},
    "VEPrecond": {"sigma_min": 0.02, "sigma_max": 100},
    "iDDPMPrecond": {"C_1": 0.001, "C_2": 0.008, "M": 1000},
}


def precond_object(precond: str, network, module_src: str = DEFAULT_SRC, easydict_kwargs: bool = True, **constants):
    """NVlabs' wrapper around our `network` (EDM: `model`; EDM2: `unet` plus the log-variance head), as a
    persistent object with its attributes and init kwargs."""
    attributes = {**PRECOND_ATTRIBUTES[precond], **constants}
    net_kwargs = nvlabs_network_kwargs(network)
    interface = {
        "img_resolution": net_kwargs["img_resolution"],
        "img_channels": net_kwargs["img_channels" if precond == "Precond" else "in_channels"],
        "label_dim": net_kwargs["label_dim"],
        "use_fp16": False,
    }
    wrapper = torch.nn.Module()
    if precond == "Precond":
        dtype = torch.float16  # EDM2's published weights are float16
        unet = to_nvlabs(network, module_src, dtype, skip=("logvar_fourier", "logvar_linear"), init_kwargs=net_kwargs)
        children = {
            "unet": unet,
            "logvar_fourier": to_nvlabs(network.logvar_fourier, module_src, dtype),
            "logvar_linear": to_nvlabs(network.logvar_linear, module_src, dtype),
        }
        extra_kwargs = {"logvar_channels": network.config.logvar_channels}
        model_kwargs = {k: v for k, v in net_kwargs.items() if k not in interface}
    else:
        dtype = None
        children = {"model": to_nvlabs(network, module_src, init_kwargs=net_kwargs)}
        model_type = "DhariwalUNet" if isinstance(network, DhariwalUNet2DModel) else "SongUNet"
        extra_kwargs = {"model_type": model_type}
        skip = (*interface, "in_channels", "out_channels")
        model_kwargs = {k: v for k, v in net_kwargs.items() if k not in skip}
    if precond == "iDDPMPrecond":
        u = iddpm_table(attributes["M"], attributes["C_1"], attributes["C_2"])
        wrapper.register_buffer("u", u)
        attributes.update(sigma_min=float(u[attributes["M"] - 1]), sigma_max=float(u[0]))
    if precond == "VPPrecond":
        beta_d, beta_min = attributes["beta_d"], attributes["beta_min"]
        sigma_min, sigma_max = (
            math.sqrt(math.exp(0.5 * beta_d * t**2 + beta_min * t) - 1) for t in (attributes["epsilon_t"], 1.0)
        )
        attributes.update(sigma_min=sigma_min, sigma_max=sigma_max)
    init = {**interface, **constants, **extra_kwargs, **model_kwargs}
    init = EasyDict(init) if easydict_kwargs else init
    state = module_state(wrapper, children, dtype, init_kwargs=init, attributes={**interface, **attributes})
    return Persistent(precond, state, module_src)


def official_layout(precond_obj, edm2: bool = False, extra: dict | None = None):
    """The top-level object of an official file: EDM's `dict(ema, loss_fn, augment_pipe, dataset_kwargs)` or EDM2's
    `EasyDict(encoder, dataset_kwargs, loss_fn, ema)`."""
    dataset_kwargs = EasyDict(class_name="training.dataset.ImageFolderDataset", path="datasets/tiny.zip", xflip=False)
    if edm2:
        encoder = Persistent(
            "StabilityVAEEncoder",
            {
                "vae_name": "stabilityai/sd-vae-ft-mse",
                "scale": np.float32(0.5) / np.array([4.17, 4.62, 3.71, 3.28], dtype=np.float32),
                "bias": np.float32(0)
                - np.array([5.81, 3.25, 0.12, -2.15], dtype=np.float32)
                * np.float32(0.5)
                / np.array([4.17, 4.62, 3.71, 3.28], dtype=np.float32),
                "batch_size": 8,
                "_vae": None,
                "_init_args": (),
                "_init_kwargs": {},
            },
            "# stand-in for training/encoders.py\n",
        )
        loss = Persistent("EDM2Loss", {"P_mean": -0.4, "P_std": 1.0, "sigma_data": 0.5, "_init_args": ()})
        data = EasyDict(encoder=encoder, dataset_kwargs=dataset_kwargs, loss_fn=loss, ema=precond_obj)
    else:
        loss = Persistent("EDMLoss", {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5, "_init_args": ()})
        augment = Persistent("AugmentPipe", {"p": 0.12, "xflip": np.float64(1e8), "_init_kwargs": {"p": 0.12}})
        data = {"ema": precond_obj, "loss_fn": loss, "augment_pipe": augment, "dataset_kwargs": dataset_kwargs}
    data.update(extra or {})
    return data


# ---- tiny networks --------------------------------------------------------------------------------------------------


def tiny_network(family: str, num_classes: int = 3, out_factor: int = 1, seed: int = 0, **overrides):
    """A tiny random network (2 channels, 8x8, two levels, attention at 4x4) with its zero-initialized output layers
    and gains made non-zero, so that a test sees a non-trivial function."""
    torch.manual_seed(seed)
    common = {"sample_size": 8, "in_channels": 2, "num_classes": num_classes, "channel_mult": [1, 2], "num_blocks": 1}
    common.update({"attention_resolutions": [4], "dropout": 0.0, **overrides})
    if family == "UNet":
        model = EDM2UNet2DModel(**common, model_channels=16, channels_per_head=8, logvar_channels=8)
        for name, p in model.named_parameters():
            if name.endswith("gain"):
                p.data.uniform_(0.5, 1.5)
        return model.eval()
    if family == "DhariwalUNet":
        model = DhariwalUNet2DModel(**common, model_channels=16, out_channels=common["in_channels"] * out_factor)
    else:
        model = SongUNet2DModel(**common, model_channels=8, out_channels=common["in_channels"] * out_factor)
    for name, p in model.named_parameters():
        if any(key in name for key in ("conv1", "proj", "aux_conv", "out_conv", "map_augment")):
            p.data.normal_(0, 0.2)
    return model.eval()
