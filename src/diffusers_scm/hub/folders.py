"""Pipeline folders, local or on the Hub: checking them, and downloading pipelines and teachers by Hub id.

Given a repository id, diffusers' own downloader (`DiffusionPipeline.download`) only accepts components from
libraries it knows (diffusers, transformers, ...) and refuses a `model_index.json` whose components are
`["diffusers_scm", ClassName]`. `download_pipeline` reads `model_index.json` first, checks that every component can be
loaded, downloads only `model_index.json` and the component folders with `huggingface_hub.snapshot_download`
(honouring `revision`, `cache_dir`, `token`, `local_files_only` and `HF_HUB_OFFLINE`), and returns the local snapshot
folder, which diffusers then loads as any local pipeline folder. `SCMPipeline.from_pretrained` and `load_teacher` go
through it, so a Hub id works wherever a folder does. This is the only part of `hub` that the pipeline imports."""

import importlib
import importlib.resources
import importlib.util
import os

from ..utils import _RESAVE, read_json


__all__ = [
    "download_pipeline",
    "download_teacher",
    "check_pipeline_folder",
    "check_network_folder",
    "local_folder",
    "pipeline_files",
    "CUSTOM_PIPELINE",
]


PIPELINE_CLASS = "SCMPipeline"


MODEL_INDEX = "model_index.json"


# diffusers' custom-pipeline entry point: `DiffusionPipeline.from_pretrained(folder, custom_pipeline=CUSTOM_PIPELINE,
# trust_remote_code=True)` builds an SCMPipeline.
CARD = "README.md"
SAMPLE_GRID = "sample_grid.png"
CUSTOM_PIPELINE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pipelines", "custom_pipeline.py"
)


_WEIGHTS_STEM = "diffusion_pytorch_model"


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
    # a tokenizer class that declares no vocabulary files holds its vocabulary itself (ByT5: the 256 bytes)
    if kind == "PreTrainedTokenizerBase" and getattr(cls, "vocab_files_names", None) != {}:
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
