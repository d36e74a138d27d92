"""The Hugging Face Hub, by job: `folders` (checking, reading and downloading pipeline folders; the only part the
pipeline imports), `cards` (model cards and sample grids) and `push` (uploads and the `python -m diffusers_scm.hub`
command). The names below are importable from `diffusers_scm.hub` itself; each module is imported when one of its
names is first used, so that importing `diffusers_scm.hub.folders` imports neither the cards nor the uploads."""

import importlib


_EXPORTS = {
    "folders": [
        "download_pipeline",
        "download_teacher",
        "check_pipeline_folder",
        "check_network_folder",
        "local_folder",
        "pipeline_files",
        "CUSTOM_PIPELINE",
        "SAMPLE_GRID",
    ],
    "cards": [
        "load_eval_results",
        "method_hyperparameters",
        "render_model_card",
        "save_model_card",
        "save_sample_grid",
    ],
    "push": ["create_hub_repo", "push_pipeline_to_hub", "main"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
