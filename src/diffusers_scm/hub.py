"""The Hugging Face Hub: model cards, pushing pipeline folders, and loading pipelines and teachers by Hub id.

Loading by Hub id. Given a repository id, diffusers' own downloader (`DiffusionPipeline.download`) only accepts
components from libraries it knows (diffusers, transformers, ...) and refuses a `model_index.json` whose components
are `["diffusers_scm", ClassName]`. `download_pipeline` reads `model_index.json` first, checks that every component
can be loaded, downloads only `model_index.json` and the component folders with `huggingface_hub.snapshot_download`
(honouring `revision`, `cache_dir`, `token`, `local_files_only` and `HF_HUB_OFFLINE`), and returns the local
snapshot folder, which diffusers then loads as any local pipeline folder. `SCMPipeline.from_pretrained` and
`load_teacher` go through it, so a Hub id works wherever a folder does.

Publishing. `save_model_card` renders `README.md` from the templates in `diffusers_scm/model_cards/` (YAML metadata
with the Hub's model-index, the teacher, method and hyperparameters from `training_args.json`, training steps and
hardware from `training_summary.json`, the evaluation table from `examples/evaluate.py`'s `results.json`, the sample
grid and a usage snippet); `push_pipeline_to_hub` uploads the pipeline folder and the card, never the training
checkpoints or logs. `python -m diffusers_scm.hub FOLDER ...` does both for a saved folder (after evaluation, say).
"""

import argparse
import importlib
import importlib.resources
import importlib.util
import json
import os
import re
from dataclasses import dataclass

from .utils import _RESAVE, read_json


__all__ = [
    "download_pipeline",
    "download_teacher",
    "check_pipeline_folder",
    "check_network_folder",
    "local_folder",
    "pipeline_files",
    "create_hub_repo",
    "push_pipeline_to_hub",
    "load_eval_results",
    "render_model_card",
    "save_model_card",
    "save_sample_grid",
    "CUSTOM_PIPELINE",
    "SAMPLE_GRID",
]

PIPELINE_CLASS = "SCMPipeline"
MODEL_INDEX = "model_index.json"
CARD = "README.md"
SAMPLE_GRID = "sample_grid.png"
EVAL_RESULTS_FILES = ("eval_results.json", "results.json")
# diffusers' custom-pipeline entry point: `DiffusionPipeline.from_pretrained(folder, custom_pipeline=CUSTOM_PIPELINE,
# trust_remote_code=True)` builds an SCMPipeline.
CUSTOM_PIPELINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pipelines", "custom_pipeline.py")

_GRID_STEPS_KEY = "diffusers_scm_steps"  # PNG text chunk: the step count of each row of the sample grid
_WEIGHTS_STEM = "diffusion_pytorch_model"
_NON_METRIC_KEYS = {"model", "pipeline", "sampler", "nfe", "steps", "sec_per_image"}
_METRIC_NAMES = {"fd_digits": "FD-digits", "fid": "FID", "paired_rmse": "paired RMSE"}
# Training arguments that say nothing about the model (paths, logging, publishing, secrets): left out of the card.
_UNREPORTED_ARGS = {
    "output_dir",
    "logging_dir",
    "report_to",
    "resume_from_checkpoint",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "validation_steps",
    "num_validation_images",
    "validation_nfe",
    "dataloader_num_workers",
    "image_column",
    "teacher",
    "student",
    "model",
    "stage1_model",
    "push_to_hub",
    "push_at_checkpoints",
    "hub_model_id",
    "hub_token",
    "hub_private_repo",
    "hub_license",
    "teacher_revision",
}

_SCM_BIBTEX = """@article{lu2024simplifying,
  title   = {Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models},
  author  = {Lu, Cheng and Song, Yang},
  journal = {arXiv preprint arXiv:2410.11081},
  year    = {2024}
}"""
_TCM_BIBTEX = """@article{lee2024truncated,
  title   = {Truncated Consistency Models},
  author  = {Lee, Sangyun and Xu, Yilun and Geffner, Tomas and Fanti, Giulia and Kreis, Karsten and Vahdat, Arash
             and Nie, Weili},
  journal = {arXiv preprint arXiv:2410.14895},
  year    = {2024}
}"""

_CM_BIBTEX = """@article{song2023consistency,
  title   = {Consistency Models},
  author  = {Song, Yang and Dhariwal, Prafulla and Chen, Mark and Sutskever, Ilya},
  journal = {arXiv preprint arXiv:2303.01469},
  year    = {2023}
}"""


@dataclass
class Method:
    name: str  # as the papers write it
    description: str
    paper: str
    bibtex: str


METHODS = {
    "scd": Method("sCD", "continuous-time consistency distillation", "Lu & Song, 2024", _SCM_BIBTEX),
    "sct": Method("sCT", "continuous-time consistency training", "Lu & Song, 2024", _SCM_BIBTEX),
    "cd": Method("CD", "discrete-time consistency distillation", "Song et al., 2023", _CM_BIBTEX),
    "ct": Method("CT", "discrete-time consistency training", "Song et al., 2023", _CM_BIBTEX),
    "tcm": Method("TCM", "truncated consistency training", "Lee et al., 2024", _TCM_BIBTEX),
    "teacher": Method("TrigFlow diffusion", "TrigFlow diffusion training", "Lu & Song, 2024", _SCM_BIBTEX),
}


# ---------------------------------------------------------------------------------------------------------------------
# Checking pipeline folders and model_index.json


def _components(index: dict) -> dict[str, tuple[str, str]]:
    """`{name: (library, class_name)}` for the components that `model_index.json` sets (not the `[null, null]`)."""
    return {
        name: (value[0], value[1])
        for name, value in index.items()
        if not name.startswith("_")
        and isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, str) for v in value)  # not a config value such as guidance_scale_range
    }


def _component_class(source: str, name: str, library: str, class_name: str):
    """The class of a component, or an `ImportError` that names the missing library or class and the fix."""
    from diffusers import pipelines

    if "." not in library and hasattr(pipelines, library):  # a diffusers pipeline module, as diffusers resolves it:
        library = f"diffusers.pipelines.{library}"  # ["stable_diffusion", "StableDiffusionSafetyChecker"] (SD 1.5)
    try:
        found = importlib.util.find_spec(library) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        package = library.split(".")[0].replace("_", "-")
        raise ImportError(
            f"{source}: the component {name!r} is a `{library}.{class_name}`, and the library {library!r} is not "
            f"installed. Install it (`pip install {package}`) and load again."
        )
    module = importlib.import_module(library)
    cls = getattr(module, class_name, None)
    if cls is None:
        version = getattr(importlib.import_module(library.split(".")[0]), "__version__", "?")
        raise ImportError(
            f"{source}: the component {name!r} is a `{library}.{class_name}`, which the installed {library} "
            f"{version} does not provide. Upgrade it (`pip install -U {library.split('.')[0].replace('_', '-')}`)."
        )
    return cls


def _check_index(index: dict, source: str, pipeline_class: str | None, components=None, exclude=()) -> dict:
    """Check `model_index.json` before anything is downloaded: the pipeline class, and that each component (all, or
    those named in `components` that the index sets, less `exclude`) can be imported. Returns
    `{name: (library, class_name)}`."""
    class_name = index.get("_class_name")
    if pipeline_class is not None and class_name != pipeline_class:
        raise ValueError(
            f"{source} holds a {class_name!r} pipeline, not a diffusers-scm {pipeline_class}. Load it with its own "
            f"class (`diffusers.{class_name}.from_pretrained`), or turn it into an {pipeline_class} with "
            f"`examples/distill.py --teacher {source}` (a consistency student) or by building "
            f"`{pipeline_class}(unet=..., scheduler=TrigFlowODEScheduler(parameterization=...))` to sample it as a "
            "diffusion model."
        )
    selected = _components(index)
    if components is not None:
        selected = {name: selected[name] for name in components if name in selected}
    selected = {name: value for name, value in selected.items() if name not in exclude}
    for name, (library, cls) in selected.items():
        _component_class(source, name, library, cls)
    return selected


def _not_a_pipeline(source: str, found: list[str] | None = None) -> ValueError:
    contents = f" (it contains {found})" if found is not None else ""
    return ValueError(
        f"{source} is not a diffusers pipeline: it has no {MODEL_INDEX}{contents}. A diffusers-scm pipeline is saved "
        "by `SCMPipeline.save_pretrained` (or by examples/distill.py and examples/train_teacher.py); a single "
        "network folder loads with its own class, e.g. `UNet2DModel.from_pretrained`."
    )


def _has_weights(folder: str, stems=(_WEIGHTS_STEM,)) -> bool:
    return any(
        name.startswith(tuple(stems)) and name.endswith((".safetensors", ".bin")) for name in os.listdir(folder)
    )


# What each kind of component must hold, by its class's bases: its config file, and the stem of its weight files by
# extension (`diffusion_pytorch_model.safetensors` for diffusers, `model.safetensors` / `pytorch_model.bin` for
# transformers).
_KINDS = {
    "ModelMixin": ("config.json", {"safetensors": _WEIGHTS_STEM, "bin": _WEIGHTS_STEM}),  # a network or a VAE
    "PreTrainedModel": ("config.json", {"safetensors": "model", "bin": "pytorch_model"}),  # a text encoder
    "SchedulerMixin": ("scheduler_config.json", {}),
    "PreTrainedTokenizerBase": (None, {}),
}
# The files that hold a tokenizer's vocabulary (besides the `vocab_file` / `tokenizer_file` its class names).
_VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "spiece.model", "tokenizer.model")


def _kind(cls) -> str | None:
    bases = {base.__name__ for base in cls.__mro__}
    return next((kind for kind in _KINDS if kind in bases), None)


def _missing(folder: str, name: str, cls) -> str | None:
    """What a component's folder lacks (its folder, config, weights or vocabulary), or None."""
    sub = os.path.join(folder, name)
    if not os.path.isdir(sub):
        return f"has no {name}/ folder"
    kind = _kind(cls)
    config, stems = _KINDS.get(kind, (None, {}))
    if config is not None and not os.path.isfile(os.path.join(sub, config)):
        return f"has no {name}/{config}"
    if stems and not _has_weights(sub, stems.values()):
        return f"has no weights in {name}/ ({stems['safetensors']}.safetensors or {stems['bin']}.bin)"
    if kind == "PreTrainedTokenizerBase":
        declared = getattr(cls, "vocab_files_names", None) or {}
        files = dict.fromkeys([declared.get("tokenizer_file"), declared.get("vocab_file"), *_VOCABULARY_FILES])
        files = [f for f in files if f]
        if not any(os.path.isfile(os.path.join(sub, f)) for f in files):
            return f"has no vocabulary in {name}/ (one of {', '.join(files)})"
    return None


def _check_files(sub: str, name: str, described: str):
    """Read every JSON file of a component's folder `sub` (named `name/` in errors) and the header of each safetensors
    file (not the tensors), and check that the shards an index lists are there: a file cut off while being written or
    downloaded is a `ValueError` that names it, before anything loads the component."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(os.listdir(sub)):
        path = os.path.join(sub, file)
        if not os.path.isfile(path):
            continue
        if file.endswith(".json"):
            try:
                content = read_json(path)
            except ValueError as e:
                raise ValueError(f"{described}: {e}") from e
            shards = content.get("weight_map") if file.endswith(".index.json") and isinstance(content, dict) else None
            shards = set((shards or {}).values()) if isinstance(shards, dict) else set()
            absent = sorted(s for s in shards if not os.path.isfile(os.path.join(sub, s)))
            if absent and len(absent) < len(shards):  # none there: another format or variant, not the one loaded
                raise ValueError(
                    f"{described}: {name}/{file} lists the weight shards {absent}, which {name}/ does not hold: the "
                    f"folder was copied or downloaded in part. {_RESAVE}"
                )
        elif file.endswith(".safetensors"):
            try:
                with safe_open(path, framework="pt"):  # reads and checks the header
                    pass
            except (SafetensorError, OSError) as e:
                raise ValueError(
                    f"{described}: {name}/{file} is not a readable safetensors file ({e}): the file is damaged or "
                    f"was cut off while being written or downloaded. {_RESAVE}"
                ) from e


def check_pipeline_folder(
    folder: str, source: str | None = None, pipeline_class: str | None = PIPELINE_CLASS, components=None, exclude=()
) -> dict:
    """
    Check a local pipeline folder and return its `model_index.json`, before any component is loaded: every component
    that the index lists has its folder, its config (networks, text encoders, schedulers), its weights (networks,
    text encoders) or its vocabulary (tokenizers); every JSON file in a component's folder parses, and every
    safetensors file has a readable header.

    Args:
        folder (`str`): the pipeline folder.
        source (`str`, *optional*): how to name it in errors (a Hub id, say); defaults to `folder`.
        pipeline_class (`str`, *optional*, defaults to `"SCMPipeline"`): the `_class_name` the folder must have;
            `None` accepts any pipeline.
        components (`list[str]`, *optional*): check only these components (default: all that the index sets).
        exclude (`list[str]`, *optional*): components not to check (those passed to `from_pretrained`, say).

    Raises:
        `ValueError`: the folder has no `model_index.json`, holds another pipeline class, lacks a component's folder,
            config, weights or vocabulary, or holds a damaged file (named with its component).
            `ImportError`: a component's library or class is not installed.
    """
    source = source or folder
    path = os.path.join(folder, MODEL_INDEX)
    if not os.path.isfile(path):
        raise _not_a_pipeline(source, sorted(os.listdir(folder)) if os.path.isdir(folder) else None)
    index = read_json(path)
    for name, (library, class_name) in _check_index(index, source, pipeline_class, components, exclude).items():
        cls = _component_class(source, name, library, class_name)
        problem = _missing(folder, name, cls)
        if problem is not None:
            raise ValueError(
                f"{source} lists the component {name!r} (`{library}.{class_name}`) in {MODEL_INDEX} but {problem}. "
                "Save or upload the whole pipeline folder again (`save_pretrained`, `push_pipeline_to_hub`); for a "
                "Hub repository read from the cache offline, the cached snapshot may be incomplete: download it "
                "again with network access."
            )
        _check_files(os.path.join(folder, name), name, f"{source}: the component {name!r} (`{library}.{class_name}`)")
    return index


def check_network_folder(folder: str, source: str | None = None):
    """
    Check a single network's folder (`config.json` and its weights, as `save_pretrained` writes them) before it is
    loaded: the weights are there, every JSON file parses and every safetensors file has a readable header.

    Args:
        folder (`str`): the network folder.
        source (`str`, *optional*): how to name it in errors; defaults to `folder`.

    Raises:
        `ValueError`: the folder has no weights, or holds a damaged file (named).
    """
    source = source or folder
    if not _has_weights(folder):
        raise ValueError(
            f"{source} has a config.json but no weights ({_WEIGHTS_STEM}.safetensors or .bin): save the network "
            "again (`save_pretrained`), or copy or download the whole folder."
        )
    name = os.path.basename(os.path.normpath(folder))
    _check_files(folder, name, f"{source}: the network")


# ---------------------------------------------------------------------------------------------------------------------
# Local folder or Hub id


def _looks_local(name: str) -> bool:
    """A path rather than a Hub id ("org/name"): absolute, relative with ./ ../ or ~, with a backslash, more than one
    '/', or a trailing separator."""
    return (
        os.path.isabs(name)
        or name in (".", "..", "~")
        or name.startswith(("./", "../", "~", ".\\", "..\\"))
        or "\\" in name
        or name.count("/") > 1
        or name.endswith(("/", os.sep))
    )


def _nearest_existing(path: str) -> str | None:
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    return parent if os.path.isdir(parent) else None


def local_folder(path_or_id: str | os.PathLike) -> str | None:
    """
    The local folder that `path_or_id` names (with `~` expanded), or `None` where it is a Hub id to download.

    Raises:
        `FileNotFoundError`: `path_or_id` looks like a local path (absolute; starting with `./`, `../` or `~`; with a
            backslash, more than one `/` or a trailing separator) and does not exist. `NotADirectoryError`: it is a
            file, not a folder.
    """
    name = os.fspath(path_or_id)
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise NotADirectoryError(
            f"{name} is a file, not a folder: pass the folder that holds a pipeline ({MODEL_INDEX}) or a network "
            "(config.json and its weights), as `save_pretrained` writes it."
        )
    if isinstance(path_or_id, os.PathLike) or _looks_local(name):
        nearest = _nearest_existing(path)
        hint = f" The nearest folder that exists is {nearest}." if nearest is not None else ""
        raise FileNotFoundError(
            f"{name} does not exist (a local folder was expected; a Hub id looks like 'org/name'). Check the path."
            + hint
        )
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Downloading by Hub id


def _offline(local_files_only: bool) -> bool:
    from huggingface_hub import constants

    return bool(local_files_only or constants.HF_HUB_OFFLINE)


def _hub_file(repo_id: str, filename: str, **hub_kwargs) -> str | None:
    """A file of a Hub repository (downloaded or from the cache), or `None` where the repository has no such file or,
    offline, the cache does not hold it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return hf_hub_download(repo_id, filename, **hub_kwargs)
    except LocalEntryNotFoundError:
        return None
    except EntryNotFoundError:
        return None


def _repo_files(repo_id: str, revision=None, cache_dir=None, token=None, local_files_only=False, **_) -> list | None:
    """The files of a repository at `revision`: listed by the Hub, or, offline or where the Hub cannot be reached,
    those of the cached snapshot (`None` where the cache does not hold that revision)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    if not _offline(local_files_only):
        try:
            return sorted(HfApi(token=token).list_repo_files(repo_id, revision=revision))
        except (RepositoryNotFoundError, RevisionNotFoundError):
            raise
        except Exception:  # the Hub cannot be reached (connection, proxy, server errors): list the cache instead
            pass
    try:
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True, allow_patterns=[MODEL_INDEX]
        )
    except LocalEntryNotFoundError:
        return None
    return sorted(
        os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
        for root, _, names in os.walk(folder)
        for name in names
    )


def _not_found(repo_id: str, revision: str | None, local_files_only: bool) -> OSError:
    from huggingface_hub import constants

    at = f" at revision {revision!r}" if revision else ""
    if _offline(local_files_only):
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "local_files_only=True"
        return OSError(
            f"{repo_id}{at} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}), and the Hub is not "
            f"asked ({why}). Download it once with network access (`hf download {repo_id}`), point HF_HUB_CACHE "
            "(or `cache_dir=`) at the cache that holds it, or pass a local folder."
        )
    return OSError(
        f"Cannot get {MODEL_INDEX} of {repo_id}{at} from the Hub, and it is not in the local cache: check the "
        "repository id, the revision, your network connection and, for a private or gated repository, your token."
    )


def _weight_patterns(name: str, variant: str | None, extension: str, stem: str = _WEIGHTS_STEM) -> list[str]:
    stem = f"{name}/{stem}" + (f".{variant}" if variant else "")
    return [f"{stem}.{extension}", f"{stem}-*-of-*.{extension}"]


def _snapshot(repo_id, patterns, revision, cache_dir, token, local_files_only, force_download) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(
        repo_id,
        allow_patterns=patterns,
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        force_download=force_download,
    )


def download_pipeline(
    repo_id: str,
    pipeline_class: str | None = PIPELINE_CLASS,
    components: list[str] | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    variant: str | None = None,
    use_safetensors: bool | None = None,
) -> str:
    """
    Download a pipeline from the Hub (or find it in the local cache) and return its local snapshot folder.

    Only `model_index.json` and the folders of its components are fetched: each network's and text encoder's config
    and its safetensors weights (its `.bin` weights where it has no safetensors and `use_safetensors` is not `True`),
    each scheduler's config, each tokenizer's files. `model_index.json` is checked before any weights are downloaded.

    Args:
        repo_id (`str`): the repository, `"org/name"`.
        pipeline_class (`str`, *optional*, defaults to `"SCMPipeline"`): the `_class_name` the repository must have;
            `None` accepts any pipeline.
        components (`list[str]`, *optional*): download only these components (default: all).
        revision (`str`, *optional*): a branch, tag or commit hash (default: the main branch).
        cache_dir (`str`, *optional*): the Hugging Face cache (default: `HF_HUB_CACHE`).
        token (`str` or `bool`, *optional*): the token for private or gated repositories (default: the saved one).
        local_files_only (`bool`, defaults to `False`): use the local cache only (as `HF_HUB_OFFLINE=1` does).
        force_download (`bool`, defaults to `False`): download again even if cached.
        variant (`str`, *optional*): weights variant, e.g. `"fp16"`.
        use_safetensors (`bool`, *optional*): `True` requires safetensors weights, `False` downloads `.bin` weights.

    Raises:
        `OSError`: the repository (or revision) is neither on the Hub nor in the cache. `ValueError`: it is not a
            pipeline of `pipeline_class`, or a component is missing. `ImportError`: a component's library or class is
            not installed.
    """
    hub = {
        "revision": revision,
        "cache_dir": cache_dir,
        "token": token,
        "local_files_only": local_files_only,
        "force_download": force_download,
    }
    index_file = _hub_file(repo_id, MODEL_INDEX, **hub)
    if index_file is None:
        files = _repo_files(repo_id, **hub)
        if files is None:
            raise _not_found(repo_id, revision, local_files_only)
        raise _not_a_pipeline(repo_id, files)
    selected = _check_index(read_json(index_file), repo_id, pipeline_class, components)

    kinds = {n: _kind(_component_class(repo_id, n, lib, cls)) for n, (lib, cls) in selected.items()}
    stems = {n: _KINDS[k][1] for n, k in kinds.items() if k is not None and _KINDS[k][1]}  # networks, text encoders
    first = "bin" if use_safetensors is False else "safetensors"
    patterns = [MODEL_INDEX] + [f"{name}/*.json" for name in selected]
    patterns += [f"{name}/*" for name, kind in kinds.items() if kind == "PreTrainedTokenizerBase"]  # vocabularies
    patterns += [p for name in stems for p in _weight_patterns(name, variant, first, stems[name][first])]
    folder = _snapshot(repo_id, patterns, **hub)
    without = [
        n
        for n in stems
        if not os.path.isdir(os.path.join(folder, n)) or not _has_weights(os.path.join(folder, n), stems[n].values())
    ]
    if without and use_safetensors is None:  # older repositories hold .bin weights only
        bins = [p for n in without for p in _weight_patterns(n, variant, "bin", stems[n]["bin"])]
        folder = _snapshot(repo_id, bins, **hub)
    check_pipeline_folder(folder, repo_id, pipeline_class, list(selected))
    return folder


def download_teacher(
    repo_id: str,
    network_components=("unet", "transformer"),
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> str:
    """
    Download what `load_teacher` needs from a Hub repository and return the local folder: for a pipeline (any
    class), `model_index.json`, the network and the scheduler; for a single network, its config, weights and any
    `scheduler_config.json` beside them. Arguments as in `download_pipeline`.
    """
    hub = {
        "revision": revision,
        "cache_dir": cache_dir,
        "token": token,
        "local_files_only": local_files_only,
        "force_download": force_download,
    }
    index_file = _hub_file(repo_id, MODEL_INDEX, **hub)
    if index_file is not None:
        index = _components(read_json(index_file))
        names = [n for n in network_components if n in index][:1]
        if not names:
            raise ValueError(
                f"{repo_id} is a pipeline without a network component ({' or '.join(network_components)}); its "
                f"components are {sorted(index)}."
            )
        return download_pipeline(repo_id, pipeline_class=None, components=names + ["scheduler"], **hub)
    if _hub_file(repo_id, "config.json", **hub) is None:
        files = _repo_files(repo_id, **hub)
        if files is None:
            raise _not_found(repo_id, revision, local_files_only)
        raise ValueError(
            f"{repo_id} is neither a diffusers pipeline folder ({MODEL_INDEX}) nor a network folder (config.json); "
            f"it contains {files}."
        )
    patterns = (
        ["config.json", "scheduler_config.json"]
        + [p for ext in ("safetensors", "bin") for p in (f"{_WEIGHTS_STEM}.{ext}", f"{_WEIGHTS_STEM}-*-of-*.{ext}")]
        + [f"{_WEIGHTS_STEM}.safetensors.index.json", f"{_WEIGHTS_STEM}.bin.index.json"]
    )
    return _snapshot(repo_id, patterns, **hub)


# ---------------------------------------------------------------------------------------------------------------------
# Pushing


def pipeline_files(folder: str) -> list[str]:
    """
    The files of a pipeline folder that are published, as paths relative to `folder`: `model_index.json`, every file
    in each component's folder, the model card `README.md` and the sample grid, where present. Training checkpoints,
    logs, sample histories and evaluation outputs next to them are not.
    """
    index = check_pipeline_folder(folder, pipeline_class=None)
    files = [MODEL_INDEX]
    for name in sorted(_components(index)):
        for root, dirs, names in os.walk(os.path.join(folder, name)):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
            files += [os.path.relpath(os.path.join(root, n), folder) for n in sorted(names) if not n.startswith(".")]
    files += [f for f in (CARD, SAMPLE_GRID) if os.path.isfile(os.path.join(folder, f))]
    return [f.replace(os.sep, "/") for f in files]


def create_hub_repo(repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Create the model repository if it does not exist; returns its full id (`"user/name"` for a bare `"name"`)."""
    from huggingface_hub import HfApi

    return HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True).repo_id


def push_pipeline_to_hub(
    folder: str,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload SCMPipeline",
    revision: str | None = None,
    create_pr: bool = False,
    delete_stale: bool = True,
):
    """
    Create the repository (if needed) and upload a pipeline folder in one commit: the files of `pipeline_files`.
    With `delete_stale`, the same commit deletes the files of an earlier upload that sit in this pipeline's component
    folders but are no longer part of it (an old `.bin` next to new safetensors, say); other files of the repository
    are left alone.

    Args:
        folder (`str`): a pipeline folder, e.g. the `--output_dir` of `examples/distill.py`.
        repo_id (`str`): `"org/name"`, or `"name"` for your own namespace.
        token (`str`, *optional*): a write token (default: the one saved by `hf auth login`).
        private (`bool`, defaults to `False`): create the repository as private.
        commit_message (`str`): the commit message.
        revision (`str`, *optional*): a branch to commit to (created if needed); default the main branch.
        create_pr (`bool`, defaults to `False`): open a pull request instead of committing.
        delete_stale (`bool`, defaults to `True`): delete stale files in the component folders (see above).

    Returns:
        `huggingface_hub.CommitInfo`: the commit (its `repo_url`, `commit_url`, `oid`).
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    files = pipeline_files(folder)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=os.path.join(folder, f)) for f in files]
    if delete_stale:
        components = {f.split("/", 1)[0] for f in files if "/" in f}
        remote = api.list_repo_files(repo_id, revision=revision)
        stale = sorted(f for f in remote if f.split("/", 1)[0] in components and "/" in f and f not in files)
        operations += [CommitOperationDelete(path_in_repo=f) for f in stale]
    return api.create_commit(
        repo_id=repo_id,
        operations=operations,
        commit_message=commit_message,
        revision=revision,
        create_pr=create_pr,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Sample grids and model cards


def save_sample_grid(
    pipe, path: str, step_counts=(1, 2), num_images: int = 8, seed: int = 0, prompts=None, image_size=None
) -> str:
    """
    Sample `num_images` images for each step count and save them as one grid (a row per step count; image i of each
    row starts from the noise of seed `seed + i` and, for class-conditional networks, has class i; for text-to-image
    pipelines, prompt i of `prompts`, one image per prompt, `image_size` pixels). The step counts (and prompts) are
    stored in the PNG, so the model card can caption the grid.
    """
    import torch
    from diffusers.utils import make_image_grid
    from PIL.PngImagePlugin import PngInfo

    num_classes = _num_classes(pipe.network.config)
    labels = [i % num_classes for i in range(num_images)] if num_classes else None
    text = {"batch_size": num_images}
    if pipe.config.get("family_pipeline") is not None:
        prompts = list(prompts or ["a photo"])
        num_images, labels = len(prompts), None
        text = {"prompt": prompts, "height": image_size, "width": image_size}
    images = []
    with torch.no_grad():
        for steps in step_counts:
            generators = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
            out = pipe(**text, num_inference_steps=steps, class_labels=labels, generator=generators)
            images += out.images
    info = PngInfo()
    info.add_text(_GRID_STEPS_KEY, ",".join(str(s) for s in step_counts))
    if "prompt" in text:
        info.add_text("diffusers_scm:prompts", json.dumps(text["prompt"]))
    make_image_grid(images, rows=len(step_counts), cols=num_images).save(path, pnginfo=info)
    return path


def _num_classes(config) -> int | None:
    for key in ("num_classes", "num_class_embeds", "num_embeds_ada_norm"):
        if config.get(key):
            return int(config[key])
    return None


def _count_parameters(network_folder: str) -> int | None:
    from safetensors import safe_open

    files = [f for f in os.listdir(network_folder) if f.startswith(_WEIGHTS_STEM) and f.endswith(".safetensors")]
    if not files:
        return None
    total = 0
    for name in files:
        with safe_open(os.path.join(network_folder, name), framework="pt") as f:
            for key in f.keys():
                count = 1
                for size in f.get_slice(key).get_shape():
                    count *= size
                total += count
    return total


def _format_count(n: int | None) -> str:
    if n is None:
        return "an unknown number of"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(v) for v in value)
    return str(value)


def _looks_like_hub_id(name) -> bool:
    return (
        isinstance(name, str)
        and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None
        and not os.path.exists(name)
    )


def load_eval_results(results) -> dict:
    """
    Read and check evaluation results in the format of `examples/evaluate.py`'s `results.json`:
    `{"rows": [{"model", "sampler", "nfe", "steps", <metrics>..., "sec_per_image"}, ...], "classifier_accuracy", ...}`.
    Every numeric (or null) row entry other than model, pipeline, sampler, nfe, steps and sec_per_image is a metric.

    Args:
        results (`str` or `dict`): the path of the JSON file, or its content.
    """
    source = results if isinstance(results, str) else "the evaluation results"
    if isinstance(results, str):
        results = read_json(results, fix="Run examples/evaluate.py again to write it.")
    rows = results.get("rows") if isinstance(results, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError(
            f"{source} has no evaluation rows: expected {{'rows': [{{'model': ..., 'nfe': ..., <metric>: ...}}]}} "
            "as examples/evaluate.py writes it."
        )
    for i, row in enumerate(rows):
        missing = [k for k in ("model", "nfe") if k not in row]
        if missing:
            raise ValueError(f"Row {i} of {source} lacks {missing}: each row names its model and its NFE.")
    return results


def _metrics(rows: list[dict]) -> list[str]:
    keys = []
    for row in rows:
        for key, value in row.items():
            if key not in _NON_METRIC_KEYS and key not in keys and (value is None or isinstance(value, (int, float))):
                keys.append(key)
    return [k for k in keys if any(isinstance(row.get(k), (int, float)) for row in rows)]


def _evaluation(results: dict) -> dict:
    """The card's evaluation table: a row per model and NFE, teachers first."""
    rows = sorted(results["rows"], key=lambda r: (r["model"] != "teacher", str(r["model"]), float(r["nfe"])))
    metrics = _metrics(rows)
    columns = ["model", "sampler", "steps", "NFE"] + [_METRIC_NAMES.get(m, m) for m in metrics] + ["s / image"]
    table = []
    for r in rows:
        values = [str(r["model"]), str(r.get("sampler", "-")), str(r.get("steps", "-")), f"{float(r['nfe']):g}"]
        values += ["-" if r.get(m) is None else f"{r[m]:.4g}" for m in metrics]
        values.append("-" if r.get("sec_per_image") is None else f"{r['sec_per_image']:.2e}")
        table.append(values)
    notes = []
    if results.get("classifier_accuracy") is not None:
        notes.append(
            "FD-digits: Frechet distance in the features of a digits classifier "
            f"({results['classifier_accuracy']:.1%} held-out accuracy) to the digits training split."
        )
    if "paired_rmse" in metrics:
        notes.append("Paired RMSE: distance to the teacher's ODE solution from the same noise.")
    if results.get("num_samples"):
        notes.append(f"{results['num_samples']} samples per row.")
    return {"columns": columns, "rows": table, "notes": notes, "metrics": metrics, "sorted_rows": rows}


def _model_index_results(evaluation: dict, model: str, dataset: str) -> list:
    """The rows of `model` as the Hub's model-index: one entry per metric and NFE."""
    from huggingface_hub import EvalResult

    out = []
    for row in evaluation["sorted_rows"]:
        if row["model"] != model:
            continue
        for metric in evaluation["metrics"]:
            if isinstance(row.get(metric), (int, float)):
                out.append(
                    EvalResult(
                        task_type="unconditional-image-generation",
                        dataset_type=dataset,
                        dataset_name=dataset,
                        metric_type=metric,
                        metric_value=float(row[metric]),
                        metric_name=f"{_METRIC_NAMES.get(metric, metric)} ({float(row['nfe']):g} NFE)",
                    )
                )
    return out


def _hardware(summary: dict) -> str:
    processes = summary.get("num_processes", 1)
    device = summary.get("device_name") or summary.get("device_type") or "an unrecorded device"
    if summary.get("device_type") == "cuda":
        text = f"{processes} x {device}"
    else:
        text = f"{device}, {processes} process{'es' if processes != 1 else ''}"
    if summary.get("mixed_precision") not in (None, "no"):
        text += f", {summary['mixed_precision']} mixed precision"
    return text


def render_model_card(
    folder: str,
    repo_id: str | None = None,
    eval_results=None,
    license: str = "apache-2.0",
    base_model: str | None = None,
    kind: str | None = None,
):
    """
    Render the model card of a pipeline folder saved by `examples/distill.py` or `examples/train_teacher.py`.

    Args:
        folder (`str`): the pipeline folder (with `training_args.json` and `training_summary.json` where the scripts
            wrote them, and the sample grid `sample_grid.png` if saved).
        repo_id (`str`, *optional*): the Hub id the card's usage snippet loads (default: the folder's path).
        eval_results (`str` or `dict`, *optional*): `examples/evaluate.py`'s `results.json` (path or content);
            default: `eval_results.json` or `results.json` in `folder`, if there.
        license (`str`, defaults to `"apache-2.0"`): the license identifier (a student inherits its teacher's).
        base_model (`str`, *optional*): the teacher's Hub id (default: the `--teacher` argument if it is a Hub id).
        kind (`str`, *optional*): `"student"` or `"teacher"` (default: from the scheduler: a `TrigFlowODEScheduler`
            pipeline is a teacher).

    Returns:
        `huggingface_hub.ModelCard`.
    """
    from huggingface_hub import ModelCard, ModelCardData

    index = check_pipeline_folder(folder)
    components = _components(index)
    network = next(n for n in ("unet", "transformer") if n in components)
    net_config = read_json(os.path.join(folder, network, "config.json"))
    sched_config = read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
    kind = kind or ("teacher" if sched_config.get("_class_name") == "TrigFlowODEScheduler" else "student")
    if kind not in ("student", "teacher"):
        raise ValueError(f"kind must be 'student' or 'teacher', not {kind!r}.")

    def optional_json(name):
        path = os.path.join(folder, name)
        return read_json(path) if os.path.isfile(path) else {}

    args, summary = optional_json("training_args.json"), optional_json("training_summary.json")
    method_key = "teacher" if kind == "teacher" else str(args.get("method", "scd"))
    method = METHODS.get(method_key) or Method(
        method_key, f"the `{method_key}` method of examples/distill.py", "Lu & Song, 2024", _SCM_BIBTEX
    )
    teacher = args.get("teacher") if kind == "student" else None
    if base_model is None and _looks_like_hub_id(teacher):
        base_model = teacher
    if teacher is not None:
        teacher = (
            f"[{teacher}](https://huggingface.co/{teacher})"
            if _looks_like_hub_id(teacher)
            else f"`{os.path.basename(os.path.normpath(teacher))}` (a local folder)"
        )

    if eval_results is None:
        found = [os.path.join(folder, f) for f in EVAL_RESULTS_FILES if os.path.isfile(os.path.join(folder, f))]
        eval_results = found[0] if found else None
    evaluation = _evaluation(load_eval_results(eval_results)) if eval_results is not None else None
    dataset = str(args.get("dataset_name") or "custom")
    model_id = repo_id or os.path.abspath(folder)
    title = (repo_id or os.path.basename(os.path.normpath(os.path.abspath(folder)))).split("/")[-1]

    index_results = _model_index_results(evaluation, kind, dataset) if evaluation else []
    tags = ["diffusers", "diffusers-scm"]
    tags += ["trigflow", "diffusion-model"] if kind == "teacher" else ["consistency-model", method_key]
    family = index.get("family_pipeline")
    card_data = ModelCardData(
        library_name="diffusers",
        license=license,
        pipeline_tag="text-to-image" if family else "unconditional-image-generation",
        tags=tags,
        base_model=base_model,
        model_name=title if index_results else None,
        eval_results=index_results or None,
    )

    num_classes = _num_classes(net_config)
    size = net_config.get("sample_size")
    channels = net_config.get("in_channels")
    images = "images"
    if size:
        res = f"{size}x{size}" if isinstance(size, int) else "x".join(str(s) for s in size)
        images = f"{res} {'grayscale' if channels == 1 else f'{channels}-channel'} images"
        if "vae" in components:
            images = f"images from {res} latents"
    training = None
    if summary:
        batch = None
        if args.get("train_batch_size"):
            total = args["train_batch_size"] * summary.get("num_processes", 1)
            total *= args.get("gradient_accumulation_steps") or 1
            batch = f"batch size {total}"
        training = {
            "steps": summary.get("steps"),
            "skipped": summary.get("skipped_steps"),
            "hardware": _hardware(summary),
            "dataset": args.get("dataset_name"),
            "batch": batch,
        }
    hyperparameters = [
        (k, _format_value(v))
        for k, v in args.items()
        if k not in _UNREPORTED_ARGS and v is not None and v is not False
    ]
    grid = None
    if os.path.isfile(os.path.join(folder, SAMPLE_GRID)):
        from PIL import Image

        with Image.open(os.path.join(folder, SAMPLE_GRID)) as im:
            steps = [int(s) for s in im.text.get(_GRID_STEPS_KEY, "").split(",") if s]
            grid_prompts = json.loads(im.text.get("diffusers_scm:prompts", "null"))
        rows = ", ".join(f"{s} step{'s' if s != 1 else ''}" for s in steps)
        caption = f"Rows: {rows}. " if rows else ""
        caption += "Each column starts from the same noise" + (", class = column index." if num_classes else ".")
        if grid_prompts:
            caption += " Prompts (by column): " + "; ".join(f'"{p}"' for p in grid_prompts) + "."
        grid = {"file": SAMPLE_GRID, "caption": caption}

    template = importlib.resources.files("diffusers_scm").joinpath("model_cards", f"{kind}_card.md").read_text()
    return ModelCard.from_template(
        card_data,
        template_str=template,
        title=title,
        model_id=model_id,
        images=images,
        method=method,
        teacher=teacher,
        teacher_parameterization=args.get("teacher_parameterization"),
        network={
            "component": network,
            "class_name": components[network][1],
            "diffusers_class": components[network][0] == "diffusers",
            "parameters": _format_count(_count_parameters(os.path.join(folder, network))),
            "num_classes": num_classes,
        },
        has_vae="vae" in components,
        scheduler={
            "class_name": sched_config.get("_class_name"),
            "parameterization": sched_config.get("parameterization", "trigflow"),
            "sigma_data": sched_config.get("sigma_data"),
            "intermediate": sched_config.get("intermediate_timesteps", 1.1),
            "solver": sched_config.get("solver"),
        },
        training=training,
        hyperparameters=hyperparameters,
        evaluation=evaluation,
        grid=grid,
        usage_steps=32 if kind == "teacher" else 2,
        family=family,
        flow_student=sched_config.get("parameterization") == "flow_matching",
        guidance_range=index.get("guidance_scale_range"),
        usage_class_labels=f"[{', '.join(str(i % num_classes) for i in range(4))}]" if num_classes else None,
    )


def save_model_card(folder: str, **kwargs) -> str:
    """Render the model card (arguments of `render_model_card`) and write it to `folder/README.md`; returns the path."""
    path = os.path.join(folder, CARD)
    render_model_card(folder, **kwargs).save(path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Command line: render the card of a saved folder (after evaluation, say) and push it


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m diffusers_scm.hub",
        description="Write the model card of a saved SCMPipeline folder and, with --push_to_hub, upload the folder.",
    )
    p.add_argument("folder", help="the pipeline folder (an --output_dir of distill.py or train_teacher.py)")
    p.add_argument("--hub_model_id", default=None, help="org/name (default: the folder's name in your namespace)")
    p.add_argument("--eval_results", default=None, help="results.json of examples/evaluate.py")
    p.add_argument("--license", default="apache-2.0", help="a student usually inherits its teacher's license")
    p.add_argument("--base_model", default=None, help="the teacher's Hub id (default: from training_args.json)")
    p.add_argument("--sample_steps", type=int, nargs="*", default=None, help="(re)draw the sample grid")
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_token", default=None, help="default: the token saved by `hf auth login`")
    p.add_argument("--hub_private_repo", action="store_true")
    args = p.parse_args(argv)

    repo_id = args.hub_model_id
    if args.push_to_hub:
        name = repo_id or os.path.basename(os.path.normpath(os.path.abspath(args.folder)))
        repo_id = create_hub_repo(name, token=args.hub_token, private=args.hub_private_repo)
    if args.sample_steps:
        from .pipelines import SCMPipeline

        pipe = SCMPipeline.from_pretrained(args.folder)
        pipe.set_progress_bar_config(disable=True)
        save_sample_grid(pipe, os.path.join(args.folder, SAMPLE_GRID), args.sample_steps)
    path = save_model_card(
        args.folder, repo_id=repo_id, eval_results=args.eval_results, license=args.license, base_model=args.base_model
    )
    print(f"Wrote {path}")
    if args.push_to_hub:
        commit = push_pipeline_to_hub(args.folder, repo_id, token=args.hub_token, private=args.hub_private_repo)
        print(f"Pushed to {commit.commit_url}")


if __name__ == "__main__":
    main()
