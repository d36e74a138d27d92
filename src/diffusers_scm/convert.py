"""Convert NVlabs' EDM and EDM2 checkpoints into diffusers pipeline folders without running pickled code (SPEC.md
section 10).

    python -m diffusers_scm.convert --checkpoint edm-cifar10-32x32-uncond-vp.pkl --output_dir edm-cifar10-vp
    python -m diffusers_scm.convert --checkpoint edm2-img64-s-1073741-0.075.pkl --output_dir edm2-img64-s
    python -m diffusers_scm.convert --checkpoint ema.safetensors --config network_kwargs.json --output_dir out
    python -m diffusers_scm.convert --checkpoint edm2-img512-s-2147483-0.130.pkl --output_dir edm2-img512-s \
        --vae stabilityai/sd-vae-ft-mse

The official checkpoints are pickles written with NVlabs' `torch_utils.persistence`: every network module is stored
as a call `_reconstruct_persistent_obj(meta)` whose `meta` holds the class name, the object's state (`_init_kwargs`,
`_modules`, `_parameters`, `_buffers`, ...) and `module_src`, the source file of the class that NVlabs' loader
executes. `SafeUnpickler` reads all of it as data: persistent objects become `PersistentRecord`s, plain torch modules
`ModuleRecord`s, `dnnlib.util.EasyDict` an `AttrDict`; tensors are rebuilt from their storages, each storage (an
old-style `torch.save` blob) loaded with `torch.load(..., weights_only=True)`; numpy scalars and arrays, `OrderedDict`
and sets are data too. Any other global is refused with an error that names it; `module_src` is never executed and
neither `torch_utils` nor `dnnlib` is imported.

The wrapper (EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond, or EDM2's Precond) and the network inside it (SongUNet,
DhariwalUNet, EDM2's UNet) are recognized by their class names; the network becomes `SongUNet2DModel`,
`DhariwalUNet2DModel` or `EDM2UNet2DModel` (same state-dict layout, "model."/"unet." stripped), and the wrapper the
"edm" parameterization with its preconditioning ("edm", "vp", "ve", "iddpm"; `EDMParameterization`), recorded in the
config of a `TrigFlowODEScheduler` (Heun, EDM's rho = 7 grid). The folder is an `SCMPipeline`: `load_teacher(folder)`,
`examples/distill.py --teacher folder` and `SCMPipeline.from_pretrained(folder)` read it. `conversion.json` beside it
records the source and what the pickle held besides the network (the latent `encoder` of EDM2's ImageNet 512 models:
its per-channel scale and bias, raw_mean/raw_std/final_mean/final_std; `dataset_kwargs`; `loss_fn`).

A latent EDM2 network (ImageNet 512) converts with `--vae` (a folder or Hub id of `stabilityai/sd-vae-ft-mse`, the VAE
its `encoder` names) into a latent pipeline: the `AutoencoderKL` is saved with the encoder's per-channel
normalization in its config, x0 = (z - latents_mean) / latents_std * scaling_factor with latents_mean = raw_mean -
final_mean raw_std / final_std, latents_std = raw_std, scaling_factor = final_std (the convention of diffusers' latent
pipelines and of `LatentCodec`; equal to EDM2's x0 = (z - raw_mean) final_std / raw_std + final_mean), and the
pipeline's `image_range` is [0, 1], because EDM2's VAE encodes and decodes images in [0, 1] rather than [-1, 1]
(SPEC.md section 10). `SCMPipeline.from_pretrained(folder)` then samples images as EDM2's own decode gives them.

A state dict (safetensors, or a `.pt` read with `weights_only=True`) converts with a JSON config: the wrapper's init
kwargs as NVlabs' training options give them (`class_name` or `precond`, `model_type` for EDM, the network kwargs),
with `img_resolution`, `img_channels` and `label_dim` inferred from the weights when absent.
"""

import _compat_pickle
import argparse
import collections
import hashlib
import inspect
import io
import json
import logging
import math
import os
import pickle
import types
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .models import DhariwalUNet2DModel, EDM2UNet2DModel, SongUNet2DModel
from .models.unet_edm import NVLABS_CONFIG_NAMES
from .models.unet_edm2 import scalar_gains_as_vectors
from .parameterizations import EDMParameterization


try:  # numpy >= 2 keeps the pickling helpers in numpy._core (numpy.core is a deprecated alias)
    from numpy._core import multiarray as _np_multiarray
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _np_multiarray


__all__ = [
    "SafeUnpickler",
    "UnsafeCheckpointError",
    "PersistentRecord",
    "ModuleRecord",
    "AttrDict",
    "read_checkpoint",
    "module_state_dict",
    "ConvertedCheckpoint",
    "convert_record",
    "convert_state_dict",
    "load_checkpoint",
    "convert_checkpoint",
    "load_vae",
    "edm2_latent_normalization",
    "NVLABS_NETWORKS",
    "NVLABS_PRECONDITIONINGS",
    "main",
]

logger = logging.getLogger(__name__)

# NVlabs' network classes -> ours (same state-dict layout; SPEC.md section 10)
NVLABS_NETWORKS = {"SongUNet": SongUNet2DModel, "DhariwalUNet": DhariwalUNet2DModel, "UNet": EDM2UNet2DModel}
# NVlabs' wrappers -> the preconditioning of `EDMParameterization` (SPEC.md section 10's table)
NVLABS_PRECONDITIONINGS = {
    "EDMPrecond": "edm",
    "VPPrecond": "vp",
    "VEPrecond": "ve",
    "iDDPMPrecond": "iddpm",
    "Precond": "edm",  # EDM2
}
# Each wrapper's constants with the defaults of NVlabs' classes (read from the checkpoint where it has them)
PRECOND_DEFAULTS = {
    "EDMPrecond": {"sigma_data": 0.5, "sigma_min": 0.0, "sigma_max": math.inf},
    "Precond": {"sigma_data": 0.5},
    "VPPrecond": {"beta_d": 19.9, "beta_min": 0.1, "M": 1000, "epsilon_t": 1e-5},
    "VEPrecond": {"sigma_min": 0.02, "sigma_max": 100.0},
    "iDDPMPrecond": {"C_1": 0.001, "C_2": 0.008, "M": 1000},
}
# What a wrapper's init kwargs hold besides the network's own kwargs
_PRECOND_ONLY_KWARGS = {
    "class_name",
    "model_type",
    "precond",
    "use_fp16",
    "sigma_data",
    "sigma_min",
    "sigma_max",
    "beta_d",
    "beta_min",
    "M",
    "epsilon_t",
    "C_1",
    "C_2",
    "logvar_channels",
}
# The sampling range of EDM's deterministic sampler, clamped to the wrapper's own (EDM, generate.py's defaults)
SAMPLING_SIGMA_MIN, SAMPLING_SIGMA_MAX, SAMPLING_RHO = 0.002, 80.0, 7.0
# The key of the network inside the official files
NETWORK_KEYS = ("ema", "net", "model")


# ---- reading a pickle as data ---------------------------------------------------------------------------------------


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint asks for something that reading it as data does not allow (a global outside the allow-list)."""


class AttrDict(dict):
    """`dnnlib.util.EasyDict` read as data: a dict whose keys are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        del self[name]


class ModuleRecord:
    """A torch module read as data: its class name and its state (the module's `__dict__`: `_parameters`,
    `_buffers`, `_modules`, ...). Nothing of the class is imported or run.

    Args:
        class_name (`str`): the class's name (qualified, for plain torch modules).
        state (`dict`): the object's state.
    """

    class_name = "Module"
    state = types.MappingProxyType({})  # until BUILD sets it (pickles create records with NEWOBJ, then BUILD)

    def __init__(self, class_name: str | None = None, state: dict | None = None):
        if class_name is not None:
            self.class_name = class_name
        self.state = {} if state is None else dict(state)

    def __setstate__(self, state):  # BUILD
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise UnsafeCheckpointError(f"The state of a {self.class_name} record is a {type(state).__name__}.")
        self.state = dict(state)

    @property
    def init_args(self) -> tuple:
        return tuple(self.state.get("_init_args") or ())

    @property
    def init_kwargs(self) -> dict | None:
        kwargs = self.state.get("_init_kwargs")
        return None if kwargs is None else dict(kwargs)

    @property
    def modules(self) -> dict:
        return dict(self.state.get("_modules") or {})

    def attribute(self, name: str, default=None):
        """A plain attribute of the object (`self.sigma_data`, say), else its init kwarg, else `default`."""
        if name in self.state:
            return self.state[name]
        return (self.init_kwargs or {}).get(name, default)

    def __repr__(self):
        return f"{type(self).__name__}({self.class_name!r}, keys={sorted(self.state)})"


class PersistentRecord(ModuleRecord):
    """An object saved with NVlabs' `torch_utils.persistence` read as data: `class_name`, `state`, and `module_src`
    (the source file of the class, kept as a string and never executed).

    Args:
        class_name (`str`): the class's name in its module.
        state (`dict`): the object's state.
        module_src (`str`): the stored source of the class's module.
        version (`int`): the persistence format's version.
    """

    def __init__(self, class_name: str, state: dict | None, module_src: str = "", version: int | None = None):
        super().__init__(class_name, state)
        self.module_src = module_src
        self.version = version


_module_record_classes: dict = {}


def _module_record_class(module: str, name: str) -> type:
    """A `ModuleRecord` subclass standing for the torch class `module.name` (pickles create it with NEWOBJ)."""
    key = f"{module}.{name}"
    if key not in _module_record_classes:
        _module_record_classes[key] = type(name, (ModuleRecord,), {"class_name": key})
    return _module_record_classes[key]


def _persistent_record(meta) -> PersistentRecord:
    # torch_utils.persistence._reconstruct_persistent_obj(meta), read as data (SPEC.md section 10)
    if not isinstance(meta, dict):
        raise UnsafeCheckpointError(f"A persistent object's meta is a {type(meta).__name__}, not a dict.")
    if meta.get("type", "class") != "class" or not isinstance(meta.get("class_name"), str):
        raise UnsafeCheckpointError(
            f"Unknown persistent object: type {meta.get('type')!r}, class {meta.get('class_name')!r}."
        )
    state = meta.get("state")
    if state is not None and not isinstance(state, dict):
        raise UnsafeCheckpointError(f"The state of the persistent {meta['class_name']} is a {type(state).__name__}.")
    src = meta.get("module_src", "")
    return PersistentRecord(meta["class_name"], state, src if isinstance(src, str) else "", meta.get("version"))


def _load_storage(data: bytes):
    # torch.storage._load_from_bytes, without its weights_only=False: a storage saved by the legacy torch.save
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafeCheckpointError(f"A storage is stored as a {type(data).__name__}, not as bytes.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation
        storage = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    if not isinstance(storage, torch.storage.TypedStorage):
        raise UnsafeCheckpointError(f"A storage blob holds a {type(storage).__name__}, not a storage.")
    return storage


def _rebuild_tensor(storage, storage_offset, size, stride):
    # torch._utils._rebuild_tensor: a view of the storage
    if not isinstance(storage, torch.storage.TypedStorage):
        raise UnsafeCheckpointError(f"A tensor is rebuilt from a {type(storage).__name__}, not from a storage.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        empty = torch.empty((0,), dtype=storage.dtype)
        return empty.set_(storage._untyped_storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    # torch._utils._rebuild_tensor_v2; backward hooks and metadata (conj/neg bits) are not data a checkpoint needs
    if backward_hooks:
        raise UnsafeCheckpointError("A tensor in the checkpoint carries backward hooks.")
    if metadata:
        raise UnsafeCheckpointError(f"A tensor in the checkpoint carries metadata {sorted(metadata)}.")
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    # torch._utils._rebuild_parameter: a parameter is read as its tensor
    if not isinstance(data, torch.Tensor):
        raise UnsafeCheckpointError(f"A parameter is rebuilt from a {type(data).__name__}, not from a tensor.")
    if backward_hooks:
        raise UnsafeCheckpointError("A parameter in the checkpoint carries backward hooks.")
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    # torch._utils._rebuild_parameter_with_state: extra Python attributes of a parameter are dropped
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _reconstructor(cls, base, state):
    # copyreg._reconstructor (protocols 0 and 1): only for the records above and plain containers
    if not (isinstance(cls, type) and issubclass(cls, (ModuleRecord, AttrDict, collections.OrderedDict))):
        raise UnsafeCheckpointError(f"copyreg._reconstructor asked to build {cls!r}.")
    obj = cls.__new__(cls)
    if state is not None and isinstance(obj, dict):
        obj.update(state)
    return obj


def _latin1_encode(text, encoding="latin1"):
    # _codecs.encode: how protocol-2 pickles store bytes
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafeCheckpointError(f"_codecs.encode with encoding {encoding!r} is not allowed.")
    return text.encode("latin1")


_SAFE_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
    ("dnnlib.util", "EasyDict"): AttrDict,
    ("dnnlib", "EasyDict"): AttrDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex,
    ("builtins", "object"): object,
    ("builtins", "dict"): dict,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    **{(f"{m}.multiarray", "scalar"): _np_multiarray.scalar for m in ("numpy.core", "numpy._core")},
    **{(f"{m}.multiarray", "_reconstruct"): _np_multiarray._reconstruct for m in ("numpy.core", "numpy._core")},
}

# torch dtypes (data) by their pickled names
_TORCH_DTYPES = (
    "float16",
    "float32",
    "float64",
    "bfloat16",
    "half",
    "float",
    "double",
    "complex64",
    "complex128",
    "uint8",
    "int8",
    "int16",
    "int32",
    "int64",
    "short",
    "int",
    "long",
    "bool",
)


class SafeUnpickler(pickle.Unpickler):
    """
    Unpickle a checkpoint as data: only the globals of an allow-list resolve (tensor and storage rebuilding, NVlabs'
    persistent objects and EasyDict as records, containers, numpy scalars and arrays, torch dtypes); plain torch
    modules (`torch.nn.modules.*`, e.g. `ModuleDict`) become `ModuleRecord`s. Any other global is an
    `UnsafeCheckpointError` that names it. Nothing is imported and no stored code runs.

    Args:
        file: a binary file object.
        source (`str`, *optional*): how to name the checkpoint in errors.
    """

    def __init__(self, file, source: str | None = None):
        super().__init__(file)
        self.source = source or getattr(file, "name", "the checkpoint")

    def find_class(self, module: str, name: str):
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names of protocol 0-2 pickles ("__builtin__")
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = _SAFE_GLOBALS.get((module, name))
        if found is not None:
            return found
        if module == "torch" and name in _TORCH_DTYPES:
            return getattr(torch, name)
        if module.startswith("torch.nn.modules.") and name in torch.nn.modules.__all__:
            return _module_record_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.source} asks for the global '{module}.{name}', which reading a checkpoint as data does not allow: "
            f"unpickling it normally would import or call '{module}.{name}'. Only tensors, storages, numbers, "
            "strings, containers and NVlabs' persistent objects are read. If this file should be a network "
            "checkpoint, it was not written by NVlabs' EDM or EDM2 code; do not load it with pickle."
        )

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(
            f"{self.source} uses a persistent id ({pid!r}): it is a torch.save file, not an NVlabs pickle; pass it "
            "as a state dict (a .pt file read with weights_only=True) with --config."
        )


def read_checkpoint(path: str):
    """
    Read an NVlabs pickle (EDM, EDM2) as data with `SafeUnpickler`: a `dict` (EDM) or an `AttrDict` (EDM2's
    EasyDict) holding `PersistentRecord`s (`ema`, `loss_fn`, `encoder`, ...) and plain data.

    Args:
        path (`str`): the `.pkl` file.
    """
    with open(path, "rb") as f:
        return SafeUnpickler(f, source=path).load()


def module_state_dict(record: ModuleRecord, prefix: str = "") -> dict:
    """The state dict of a module record (parameters, persistent buffers, and those of its submodules, by name),
    as `torch.nn.Module.state_dict` would give it."""
    if not isinstance(record, ModuleRecord):
        raise ValueError(f"Expected a module record at {prefix or 'the top level'}, found a {type(record).__name__}.")
    state = record.state
    skip = set(state.get("_non_persistent_buffers_set") or ())
    out = {}
    for kind in ("_parameters", "_buffers"):
        for name, value in (state.get(kind) or {}).items():
            if value is None or (kind == "_buffers" and name in skip):
                continue
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{prefix}{name} of the {record.class_name} record is a {type(value).__name__}.")
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(module_state_dict(child, f"{prefix}{name}."))
    return out


def _plain(value):
    """Checkpoint data as JSON-able Python: numpy scalars and arrays, tuples, records (by class name and kwargs)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, ModuleRecord):
        return {"class_name": value.class_name, "init_kwargs": _plain(value.init_kwargs)}
    if isinstance(value, torch.Tensor):
        return {"tensor": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


# ---- from NVlabs' networks and wrappers to ours ---------------------------------------------------------------------


@dataclass
class ConvertedCheckpoint:
    """
    A converted network with its parameterization.

    Args:
        network (`ModelMixin`): `SongUNet2DModel`, `DhariwalUNet2DModel` or `EDM2UNet2DModel`, in eval mode.
        parameterization (`EDMParameterization`): the wrapper's preconditioning in TrigFlow coordinates.
        precond (`str`): NVlabs' wrapper class ("EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond", "Precond").
        family (`str`): NVlabs' network class ("SongUNet", "DhariwalUNet", "UNet").
        sigma_min (`float`), sigma_max (`float`): the noise levels the wrapper supports.
        metadata (`dict`): JSON-able facts for `conversion.json` (the wrapper's constants, the latent encoder, ...).
    """

    network: torch.nn.Module
    parameterization: EDMParameterization
    precond: str
    family: str
    sigma_min: float
    sigma_max: float
    metadata: dict = field(default_factory=dict)

    def scheduler(self):
        """A `TrigFlowODEScheduler` for the network: Heun on EDM's rho = 7 grid over the supported range within
        [0.002, 80] (EDM's deterministic sampler), its config naming the parameterization and its c_noise map."""
        from .schedulers import TrigFlowODEScheduler

        sd = self.parameterization.sigma_data
        lo = max(SAMPLING_SIGMA_MIN, self.sigma_min)
        hi = min(SAMPLING_SIGMA_MAX, self.sigma_max)
        return TrigFlowODEScheduler(
            parameterization="edm",
            **self.parameterization.config(),
            solver="heun",
            timestep_spacing="karras",
            sigma_min=lo,
            sigma_max=hi,
            max_timesteps=math.atan(hi / sd),
            rho=SAMPLING_RHO,
        )


def _float(value, what: str) -> float:
    try:
        return float(_plain(value))
    except (TypeError, ValueError):
        raise ValueError(f"{what} is {value!r}, not a number.") from None


def _precond_constants(precond: str, lookup) -> dict:
    """The wrapper's constants: `lookup(name, default)` (the record's attribute or init kwarg, or a config key)."""
    return {k: _float(lookup(k, v), f"{precond}.{k}") for k, v in PRECOND_DEFAULTS[precond].items()}


def _parameterization(precond: str, constants: dict, sigma_data: float | None) -> tuple:
    """`(EDMParameterization, sigma_min, sigma_max)` of an NVlabs wrapper (SPEC.md section 10)."""
    kind = NVLABS_PRECONDITIONINGS[precond]
    if kind == "edm":
        stored = constants["sigma_data"]
        if sigma_data is not None and abs(sigma_data - stored) > 1e-12:
            raise ValueError(
                f"The {precond} was trained with sigma_data = {stored}; its TrigFlow scale must be the same "
                f"(got --sigma_data {sigma_data}). Leave --sigma_data unset."
            )
        p = EDMParameterization(sigma_data=stored)
        return p, constants.get("sigma_min", 0.0), constants.get("sigma_max", math.inf)
    sd = 0.5 if sigma_data is None else sigma_data  # a free choice for VP, VE and iDDPM networks
    if kind == "ve":
        p = EDMParameterization(sigma_data=sd, preconditioning="ve")
        return p, constants["sigma_min"], constants["sigma_max"]
    M = int(constants["M"])
    if kind == "vp":
        beta_d, beta_min = constants["beta_d"], constants["beta_min"]
        p = EDMParameterization(
            sd, preconditioning="vp", num_train_timesteps=M, vp_beta_d=beta_d, vp_beta_min=beta_min
        )

        def sigma(tau):  # VPPrecond.sigma: sqrt(exp(beta_d tau^2 / 2 + beta_min tau) - 1)
            return math.sqrt(math.expm1(0.5 * beta_d * tau**2 + beta_min * tau))

        return p, sigma(constants["epsilon_t"]), sigma(1.0)
    p = EDMParameterization(
        sd, preconditioning="iddpm", num_train_timesteps=M, iddpm_c1=constants["C_1"], iddpm_c2=constants["C_2"]
    )
    return p, float(p.iddpm_sigmas[M - 1]), float(p.iddpm_sigmas[0])


def _network_kwargs_from_precond(precond: str, family: str, kwargs: dict) -> dict:
    """The network's kwargs (NVlabs' names) as the wrapper builds the network from its own init kwargs."""
    model_kwargs = {k: v for k, v in kwargs.items() if k not in _PRECOND_ONLY_KWARGS}
    for key in ("img_resolution", "img_channels"):
        if key not in model_kwargs:
            raise ValueError(f"The {precond} kwargs lack {key!r}; give it in the config.")
    model_kwargs.setdefault("label_dim", 0)
    if family == "UNet":  # EDM2: UNet(img_resolution, img_channels, label_dim, **unet_kwargs)
        return model_kwargs
    channels = model_kwargs.pop("img_channels")
    factor = 2 if precond == "iDDPMPrecond" else 1  # iDDPM's learned variance
    return {**model_kwargs, "in_channels": channels, "out_channels": factor * channels}


def _network_config(family: str, nvlabs_kwargs: dict) -> dict:
    """Our network's config from NVlabs' kwargs (`NVLABS_CONFIG_NAMES` renamed, numpy values as Python)."""
    cls = NVLABS_NETWORKS[family]
    config = {NVLABS_CONFIG_NAMES.get(k, k): _plain(v) for k, v in nvlabs_kwargs.items()}
    accepted = [k for k in inspect.signature(cls.__init__).parameters if k != "self"]
    unknown = sorted(set(config) - set(accepted))
    if unknown:
        raise ValueError(
            f"NVlabs' {family} was built with {unknown}, which {cls.__name__} does not take (it takes {accepted}); "
            "the checkpoint comes from a modified version of NVlabs' code."
        )
    return config


def _network_state_dict(state_dict: dict, precond: str) -> tuple:
    """`(network_state, extra)`: the wrapper's keys with "model."/"unet." stripped (EDM2's "logvar_*" kept, SPEC.md
    section 10); `extra` holds what belongs to the wrapper itself (iDDPM's table `u`)."""
    inner = "unet." if precond == "Precond" else "model."
    network, extra = {}, {}
    for key, value in state_dict.items():
        if key.startswith(inner):
            network[key[len(inner) :]] = value
        elif precond == "Precond" and key.startswith(("logvar_fourier.", "logvar_linear.")):
            network[key] = value
        else:
            extra[key] = value
    unexpected = sorted(set(extra) - ({"u"} if precond == "iDDPMPrecond" else set()))
    if unexpected:
        raise ValueError(f"The {precond} holds tensors outside its network: {unexpected[:8]}.")
    return network, extra


def _build_network(family: str, config: dict, state_dict: dict) -> torch.nn.Module:
    """Our network with the checkpoint's weights (float32; EDM2's float16 weights widen exactly). It is built on the
    meta device, without initializing weights that the checkpoint replaces (every parameter and buffer is in it)."""
    cls = NVLABS_NETWORKS[family]
    with torch.device("meta"):
        network = cls(**config)
    if family == "UNet":  # EDM2's 0-dim gains as the (1,)-shaped parameters of EDM2UNet2DModel (FSDP shards them)
        state_dict = scalar_gains_as_vectors(dict(state_dict))
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        shapes = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:4]]
        raise ValueError(
            f"The {family} weights do not fit {cls.__name__}({config}): missing {missing[:6]}, unexpected "
            f"{unexpected[:6]}, shapes (checkpoint vs network) {shapes}. The network kwargs in the checkpoint or "
            "config do not describe these weights."
        )
    with torch.no_grad():
        network.load_state_dict({k: v.to(torch.float32).contiguous() for k, v in state_dict.items()}, assign=True)
    return network.eval().requires_grad_(False)


def _check_iddpm_table(p: EDMParameterization, stored: torch.Tensor | None):
    """The checkpoint's own iDDPM table (a float32 buffer) agrees with the one the parameterization computes."""
    if stored is None:
        return
    ours = p.iddpm_sigmas
    if stored.shape != ours.shape or not torch.allclose(stored.double(), ours, rtol=1e-5, atol=1e-7):
        raise ValueError(
            f"The iDDPMPrecond table u ({tuple(stored.shape)}) differs from the one its constants M, C_1, C_2 "
            f"({p.num_train_timesteps}, {p.iddpm_c1}, {p.iddpm_c2}) give: the checkpoint was not written by NVlabs' "
            "iDDPMPrecond."
        )


def _encoder_metadata(record) -> dict | None:
    """EDM2's latent encoder: x0 = z * scale + bias per channel, with raw_mean, raw_std, final_mean, final_std
    (SPEC.md section 10: x0 = (z - raw_mean) * final_std / raw_std + final_mean)."""
    if not isinstance(record, ModuleRecord):
        return None
    out = {"class_name": record.class_name, "init_kwargs": _plain(record.init_kwargs or {})}
    for key in ("vae_name", "batch_size"):
        if key in record.state:
            out[key] = _plain(record.state[key])
    if "scale" in record.state and "bias" in record.state:
        scale = np.asarray(record.state["scale"], dtype=np.float64).reshape(-1)
        bias = np.asarray(record.state["bias"], dtype=np.float64).reshape(-1)
        kwargs = record.init_kwargs or {}
        final_mean = float(np.mean(kwargs.get("final_mean", 0.0)))
        final_std = float(np.mean(kwargs.get("final_std", 0.5)))
        out.update(
            scale=scale.tolist(),
            bias=bias.tolist(),
            final_mean=final_mean,
            final_std=final_std,
            raw_mean=_plain(kwargs.get("raw_mean", ((final_mean - bias) / scale).tolist())),
            raw_std=_plain(kwargs.get("raw_std", (final_std / scale).tolist())),
        )
    return out


def convert_record(record: ModuleRecord, sigma_data: float | None = None) -> ConvertedCheckpoint:
    """
    Convert an NVlabs wrapper read as data (EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond, EDM2's Precond) into our
    network and its parameterization.

    Args:
        record (`ModuleRecord`): the wrapper, e.g. `read_checkpoint(path)["ema"]`.
        sigma_data (`float`, *optional*): TrigFlow's scale for VP, VE and iDDPM networks (0.5 by default); EDM's
            wrappers carry their own.
    """
    precond = getattr(record, "class_name", type(record).__name__)
    if precond in NVLABS_NETWORKS:
        raise ValueError(
            f"The checkpoint holds a bare {precond} without its preconditioning wrapper; export its state dict and "
            "convert it with a config that names the wrapper (`class_name`)."
        )
    if precond not in NVLABS_PRECONDITIONINGS:
        raise ValueError(
            f"The network is a {precond}; expected one of NVlabs' wrappers {', '.join(NVLABS_PRECONDITIONINGS)}."
        )
    inner_name = "unet" if precond == "Precond" else "model"
    inner = record.modules.get(inner_name)
    if not isinstance(inner, ModuleRecord) or inner.class_name not in NVLABS_NETWORKS:
        found = getattr(inner, "class_name", type(inner).__name__)
        raise ValueError(f"The {precond}'s `{inner_name}` is a {found}; expected one of {', '.join(NVLABS_NETWORKS)}.")
    family = inner.class_name
    if (family == "UNet") != (precond == "Precond"):
        raise ValueError(f"A {family} inside a {precond}: NVlabs' code builds no such pair.")
    if inner.init_kwargs is not None and not inner.init_args:
        nvlabs_kwargs = inner.init_kwargs
    elif record.init_kwargs is not None and not record.init_args:
        nvlabs_kwargs = _network_kwargs_from_precond(precond, family, record.init_kwargs)
    else:
        raise ValueError(
            f"The {family} record has no init kwargs (saved with `_record_init_args = False`?): convert its state "
            "dict with a config instead."
        )
    network_state, extra = _network_state_dict(module_state_dict(record), precond)
    config = _network_config(family, nvlabs_kwargs)
    if family == "UNet" and "logvar_fourier.freqs" in network_state:
        config["logvar_channels"] = int(network_state["logvar_fourier.freqs"].shape[0])
    network = _build_network(family, config, network_state)
    constants = _precond_constants(precond, record.attribute)
    p, sigma_min, sigma_max = _parameterization(precond, constants, sigma_data)
    if precond == "iDDPMPrecond":
        _check_iddpm_table(p, extra.get("u"))
    metadata = {"precond": precond, "network": family, "precond_constants": _plain(constants)}
    metadata["precond_init_kwargs"] = _plain(record.init_kwargs)
    return ConvertedCheckpoint(network, p, precond, family, sigma_min, sigma_max, metadata)


def _infer_interface(state_dict: dict, family: str) -> dict:
    """`img_resolution`, `img_channels`, `label_dim` from a wrapper's state dict (NVlabs' key names)."""
    prefix = "unet." if family == "UNet" else "model."
    convs = [k for k in state_dict if k.startswith(prefix + "enc.") and k.endswith("_conv.weight")]
    out = {}
    if convs:
        level = convs[0][len(prefix + "enc.") :].split("_")[0]  # "32x32"
        out["img_resolution"] = int(level.split("x")[0])
        channels = int(state_dict[convs[0]].shape[1])
        out["img_channels"] = channels - 1 if family == "UNet" else channels  # EDM2 adds a constant channel
    label = state_dict.get(prefix + ("emb_label.weight" if family == "UNet" else "map_label.weight"))
    out["label_dim"] = 0 if label is None else int(label.shape[1])
    return out


def _strip_wrappers(state_dict: dict) -> dict:
    """Drop the prefixes that training wrappers add ("module." of DDP, "_orig_mod." of torch.compile)."""
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def convert_state_dict(state_dict: dict, config: dict, sigma_data: float | None = None) -> ConvertedCheckpoint:
    """
    Convert an NVlabs wrapper given as a state dict plus a config.

    Args:
        state_dict (`dict`): the wrapper's tensors ("model.*" / "unet.*", EDM2's "logvar_*", iDDPM's "u"), or the
            network's own (our key names, as `SongUNet2DModel` etc. use them).
        config (`dict`): the wrapper's init kwargs in NVlabs' names: `class_name` (e.g.
            "training.networks.EDMPrecond") or `precond` ("EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond",
            "Precond"), `model_type` ("SongUNet", "DhariwalUNet"; EDM2 is always its "UNet"), the network's kwargs
            and the wrapper's constants (`sigma_data`, `beta_d`, `M`, ...). A training-options file's
            `network_kwargs` entry works as it is. Missing `img_resolution`, `img_channels`, `label_dim` are read off
            the weights.
        sigma_data (`float`, *optional*): TrigFlow's scale for VP, VE and iDDPM networks (0.5 by default).
    """
    config = dict(config.get("network_kwargs", config))
    precond = config.get("precond") or str(config.get("class_name", "")).rsplit(".", 1)[-1]
    if precond not in NVLABS_PRECONDITIONINGS:
        raise ValueError(
            f"The config names the wrapper {precond or None!r} (`precond` or `class_name`); use one of "
            f"{', '.join(NVLABS_PRECONDITIONINGS)}."
        )
    default_family = {"Precond": "UNet", "VPPrecond": "SongUNet", "VEPrecond": "SongUNet"}.get(precond, "DhariwalUNet")
    family = "UNet" if precond == "Precond" else config.get("model_type", default_family)
    if family not in NVLABS_NETWORKS:
        raise ValueError(f"Unknown model_type {family!r}: use one of {', '.join(NVLABS_NETWORKS)}.")
    state_dict = _strip_wrappers(dict(state_dict))
    inner = "unet." if family == "UNet" else "model."
    if not any(k.startswith(inner) for k in state_dict):  # our key names: put the wrapper's prefix back
        state_dict = {
            (k if k.startswith(("logvar_fourier.", "logvar_linear.")) or k == "u" else inner + k): v
            for k, v in state_dict.items()
        }
    kwargs = {**_infer_interface(state_dict, family), **config}
    network_state, extra = _network_state_dict(state_dict, precond)
    nvlabs_kwargs = _network_kwargs_from_precond(precond, family, kwargs)
    net_config = _network_config(family, nvlabs_kwargs)
    if family == "UNet":
        freqs = network_state.get("logvar_fourier.freqs")
        net_config["logvar_channels"] = int(config.get("logvar_channels", 128 if freqs is None else freqs.shape[0]))
    network = _build_network(family, net_config, network_state)
    constants = _precond_constants(precond, lambda k, d: config.get(k, d))
    p, sigma_min, sigma_max = _parameterization(precond, constants, sigma_data)
    if precond == "iDDPMPrecond":
        _check_iddpm_table(p, extra.get("u"))
    metadata = {"precond": precond, "network": family, "precond_constants": _plain(constants)}
    metadata["precond_init_kwargs"] = _plain(config)
    return ConvertedCheckpoint(network, p, precond, family, sigma_min, sigma_max, metadata)


def _is_pickle(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and head[1] <= pickle.HIGHEST_PROTOCOL


def _read_state_dict(path: str, network_key: str | None) -> dict:
    """A state dict from safetensors or from a `.pt` read with `weights_only=True` (the network's entry of a
    training checkpoint: `network_key`, else "ema", "net", "model", "state_dict")."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    data = torch.load(path, map_location="cpu", weights_only=True)
    keys = [network_key] if network_key else [*NETWORK_KEYS, "state_dict"]
    while isinstance(data, dict) and not all(isinstance(v, torch.Tensor) for v in data.values()):
        key = next((k for k in keys if isinstance(data.get(k), dict)), None)
        if key is None:
            raise ValueError(
                f"{path} holds {sorted(data)[:10]}, not a state dict; name the network's entry with --network_key."
            )
        data = data[key]
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a state dict.")
    return data


def load_checkpoint(
    checkpoint: str, config: dict | str | None = None, sigma_data: float | None = None, network_key: str | None = None
) -> tuple:
    """
    Read and convert a checkpoint: `(ConvertedCheckpoint, extras)` where `extras` holds what an NVlabs pickle stores
    besides the network (`encoder`, `dataset_kwargs`, `loss_fn`, ..., as JSON-able data).

    Args:
        checkpoint (`str`): an NVlabs pickle (`.pkl`), a safetensors file or a `.pt` state dict.
        config (`dict` or `str`, *optional*): for a state dict, the wrapper's config (a dict or a JSON file).
        sigma_data (`float`, *optional*): TrigFlow's scale for VP, VE and iDDPM networks.
        network_key (`str`, *optional*): the network's entry in the file (default: "ema", then "net", "model").
    """
    if _is_pickle(checkpoint) and not checkpoint.endswith((".pt", ".pth", ".bin", ".ckpt")):
        data = read_checkpoint(checkpoint)
        if isinstance(data, ModuleRecord):
            record, data = data, {}
        elif isinstance(data, dict):
            keys = [network_key] if network_key else list(NETWORK_KEYS)
            key = next((k for k in keys if isinstance(data.get(k), ModuleRecord)), None)
            if key is None:
                raise ValueError(
                    f"{checkpoint} holds {sorted(map(str, data))}; none of them ({', '.join(keys)}) is a network. "
                    "Name the network's entry with --network_key."
                )
            record = data[key]
            data = {k: v for k, v in data.items() if k != key}
        else:
            raise ValueError(f"{checkpoint} holds a {type(data).__name__}, not NVlabs' dict of networks.")
        converted = convert_record(record, sigma_data)
        extras = {k: _plain(v) for k, v in data.items() if k != "encoder"}
        encoder = _encoder_metadata(data.get("encoder"))
        if encoder is not None:
            extras["encoder"] = encoder
        return converted, extras
    if config is None:
        raise ValueError(
            f"{checkpoint} is a state dict: pass --config with the wrapper's kwargs (`class_name` or `precond`, "
            "`model_type`, the network kwargs), as NVlabs' training options give them."
        )
    if isinstance(config, str):
        with open(config, encoding="utf-8") as f:
            config = json.load(f)
    return convert_state_dict(_read_state_dict(checkpoint, network_key), config, sigma_data), {}


def load_vae(path_or_id: str, **hub_kwargs):
    """
    The `AutoencoderKL` of a latent EDM2 network (`stabilityai/sd-vae-ft-mse`), in float32 and eval mode, through
    diffusers' `from_pretrained`.

    Args:
        path_or_id (`str`): a VAE folder (`config.json` and weights), a pipeline folder with a `vae/` component, or a
            Hub id.
        hub_kwargs: `revision`, `cache_dir`, `token`, `local_files_only` for a Hub id.
    """
    from diffusers import AutoencoderKL

    kwargs = dict(hub_kwargs)
    if os.path.isdir(path_or_id):
        has_vae_folder = os.path.isfile(os.path.join(path_or_id, "vae", "config.json"))
        if not os.path.isfile(os.path.join(path_or_id, "config.json")) and has_vae_folder:
            kwargs["subfolder"] = "vae"  # a pipeline folder
        elif not os.path.isfile(os.path.join(path_or_id, "config.json")):
            raise ValueError(
                f"--vae {path_or_id} is a folder without config.json (or vae/config.json): give an AutoencoderKL "
                "folder or the Hub id stabilityai/sd-vae-ft-mse."
            )
    vae = AutoencoderKL.from_pretrained(path_or_id, torch_dtype=torch.float32, **kwargs)
    return vae.eval().requires_grad_(False)


def edm2_latent_normalization(encoder: dict) -> dict:
    """
    EDM2's latent normalization as diffusers' VAE config entries (SPEC.md section 10):
    x0 = z * scale + bias = (z - latents_mean) / latents_std * scaling_factor with scaling_factor = final_std,
    latents_std = final_std / scale (= raw_std), latents_mean = -bias / scale (= raw_mean - final_mean raw_std /
    final_std), from the encoder's stored per-channel scale and bias.

    Args:
        encoder (`dict`): the `encoder` record of `conversion.json` (`scale`, `bias`, `final_std`).
    """
    scale = np.asarray(encoder["scale"], dtype=np.float64)
    bias = np.asarray(encoder["bias"], dtype=np.float64)
    final_std = float(encoder.get("final_std", 0.5))
    return {
        "latents_mean": (-bias / scale).tolist(),
        "latents_std": (final_std / scale).tolist(),
        "scaling_factor": final_std,
        "shift_factor": None,
    }


def _latent_components(encoder: dict | None, vae_path: str, network, checkpoint: str) -> dict:
    """`vae` and `image_range` of a latent EDM2 pipeline: the VAE with the encoder's normalization in its config."""
    if not encoder or encoder.get("scale") is None:
        found = "no encoder" if not encoder else f"a {encoder.get('class_name')} (pixels)"
        raise ValueError(
            f"--vae is for latent EDM2 networks, whose pickle holds a StabilityVAEEncoder; {checkpoint} holds "
            f"{found}. Drop --vae."
        )
    vae = load_vae(vae_path)
    channels = int(vae.config.latent_channels)
    if channels != len(encoder["scale"]) or channels != network.config.in_channels:
        raise ValueError(
            f"The VAE {vae_path} has {channels} latent channels, but the encoder normalizes {len(encoder['scale'])} "
            f"and the network takes {network.config.in_channels}: use the VAE the encoder names "
            f"({encoder.get('vae_name', 'stabilityai/sd-vae-ft-mse')})."
        )
    vae.register_to_config(**edm2_latent_normalization(encoder))
    return {"vae": vae, "image_range": [0.0, 1.0]}  # EDM2's VAE takes and gives images in [0, 1]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_checkpoint(
    checkpoint: str,
    output_dir: str,
    config: dict | str | None = None,
    sigma_data: float | None = None,
    network_key: str | None = None,
    vae: str | None = None,
) -> ConvertedCheckpoint:
    """
    Convert an NVlabs EDM/EDM2 checkpoint into an `SCMPipeline` folder (the network, a `TrigFlowODEScheduler` whose
    config names the parameterization and its c_noise map, and `conversion.json`), written whole or not at all; with
    `vae`, a latent EDM2 network's folder holds the VAE too (see the module docstring).

    Args:
        checkpoint (`str`): an NVlabs pickle, or a state dict (safetensors / `.pt`) with `config`.
        output_dir (`str`): the pipeline folder to write.
        config (`dict` or `str`, *optional*): the wrapper's config for a state dict (see `convert_state_dict`).
        sigma_data (`float`, *optional*): TrigFlow's scale for VP, VE and iDDPM networks (0.5 by default).
        network_key (`str`, *optional*): the network's entry in the file (default: "ema", then "net", "model").
        vae (`str`, *optional*): for a latent EDM2 pickle, a folder or Hub id of its `AutoencoderKL`
            (stabilityai/sd-vae-ft-mse).
    """
    from .pipelines import SCMPipeline
    from .utils import atomic_folder

    converted, extras = load_checkpoint(checkpoint, config, sigma_data, network_key)
    latent = {} if vae is None else _latent_components(extras.get("encoder"), vae, converted.network, checkpoint)
    pipeline = SCMPipeline(unet=converted.network, scheduler=converted.scheduler(), **latent)
    if latent:
        extras = {**extras, "vae": vae, "image_range": latent["image_range"]}
    record = {
        "source": os.path.basename(checkpoint),
        "sha256": _sha256(checkpoint),
        **converted.metadata,
        "parameterization": {"name": "edm", **converted.parameterization.config()},
        "sigma_min": _plain(converted.sigma_min),
        "sigma_max": _plain(converted.sigma_max),
        **extras,
    }
    with atomic_folder(output_dir) as tmp:
        pipeline.save_pretrained(tmp)
        with open(os.path.join(tmp, "conversion.json"), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2, sort_keys=True)
    if extras.get("encoder", {}).get("scale") is not None and vae is None:
        logger.warning(
            "%s is a latent EDM2 network (its encoder maps images through %s). The folder holds the network and its "
            "scheduler only: convert again with --vae %s for a pipeline that decodes images, or sample with "
            "output_type='latent' and decode with conversion.json's encoder record (x0 = z * scale + bias per "
            "channel).",
            checkpoint,
            extras["encoder"].get("vae_name", "a VAE"),
            extras["encoder"].get("vae_name", "stabilityai/sd-vae-ft-mse"),
        )
    return converted


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_scm.convert",
        description="Convert an NVlabs EDM/EDM2 checkpoint into an SCMPipeline folder, reading it as data only.",
    )
    parser.add_argument("--checkpoint", required=True, help="NVlabs .pkl, or a state dict (.safetensors / .pt).")
    parser.add_argument("--output_dir", required=True, help="The pipeline folder to write.")
    parser.add_argument("--config", default=None, help="For a state dict: JSON with the wrapper's kwargs.")
    parser.add_argument("--sigma_data", type=float, default=None, help="TrigFlow scale of VP/VE/iDDPM networks.")
    parser.add_argument("--network_key", default=None, help="The network's entry in the file (default: ema).")
    parser.add_argument(
        "--vae",
        default=None,
        help="Latent EDM2: a folder or Hub id of its AutoencoderKL (stabilityai/sd-vae-ft-mse), kept in the pipeline.",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    converted = convert_checkpoint(
        args.checkpoint, args.output_dir, args.config, args.sigma_data, args.network_key, vae=args.vae
    )
    params = sum(p.numel() for p in converted.network.parameters())
    logger.info(
        "Wrote %s: %s (%.1fM parameters) in %s, parameterization %s.",
        args.output_dir,
        type(converted.network).__name__,
        params / 1e6,
        converted.precond,
        converted.parameterization,
    )


if __name__ == "__main__":
    main()
