"""Publishing a saved pipeline folder: `push_pipeline_to_hub` uploads the folder and its card, never the training
checkpoints or logs; `python -m diffusers_scm.hub FOLDER ...` writes the card of a saved folder (after evaluation, say)
and, with `--push_to_hub`, uploads it."""

import argparse
import os

from .cards import save_model_card, save_sample_grid
from .folders import SAMPLE_GRID, pipeline_files


__all__ = ["create_hub_repo", "push_pipeline_to_hub"]


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
        from ..pipelines import SCMPipeline

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
