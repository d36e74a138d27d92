"""The Hub, offline: loading by Hub id from a local cache laid out as the Hub's, model cards, and uploads (the HTTP calls
of `huggingface_hub.HfApi` replaced by recorders)."""

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMPipeline, DDPMScheduler
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, RepoUrl, constants
from safetensors.torch import load, load_file

from diffusers_scm import SCMPipeline, SCMUNet2DModel, TrigFlowODEScheduler, TrigFlowScheduler
from diffusers_scm.hub import (
    download_pipeline,
    pipeline_files,
    push_pipeline_to_hub,
    render_model_card,
    save_model_card,
    save_sample_grid,
)
from diffusers_scm.training import load_teacher


ROOT = Path(__file__).resolve().parents[1]
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


# ---------------------------------------------------------------------------------------------------------------------
# A local Hugging Face cache, laid out as huggingface_hub lays it out


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One intra-op thread, here and in subprocesses: the networks are tiny, and spinning threads on a shared CPU cost
    far more than they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache under tmp_path, with the Hub switched off (HF_HUB_OFFLINE=1), in the environment (for
    subprocesses) and in huggingface_hub's constants (read once at import)."""
    home = tmp_path / "hf"
    cache = home / "hub"
    cache.mkdir(parents=True)
    for key, value in {"HF_HOME": home, "HF_HUB_CACHE": cache, "HF_MODULES_CACHE": home / "modules"}.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def put_in_cache(cache: Path, repo_id: str, folder, commit: str, refs=("main",)) -> Path:
    """Store `folder` as revision `commit` of `repo_id`: content-addressed blobs, a snapshot of relative symlinks,
    `refs/<branch>` files, and the tree listing that an online download records (`trees/<commit>.json`)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    tree = {}
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(folder).as_posix()
        data = path.read_bytes()
        blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id
        lfs = path.suffix in (".safetensors", ".bin", ".png")
        sha256 = hashlib.sha256(data).hexdigest()
        blob = repo / "blobs" / (sha256 if lfs else blob_id)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
        tree[rel] = {
            "size": len(data),
            "blob_id": blob_id,
            **({"lfs_sha256": sha256, "lfs_size": len(data)} if lfs else {}),
        }
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    (repo / "trees").mkdir(exist_ok=True)
    (repo / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": tree}))
    return snapshot


def tiny_student(seed=0, num_classes=10, scheduler=None) -> SCMPipeline:
    torch.manual_seed(seed)
    network = SCMUNet2DModel(
        sample_size=8,
        in_channels=1,
        model_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        attention_head_dim=8,
        num_classes=num_classes,
        time_embedding_channels=16,
        norm_num_groups=4,
    ).eval()
    with torch.no_grad():  # the output layer starts at zero: move every weight so that the samples depend on them
        for p in network.parameters():
            p.add_(0.1 * torch.randn_like(p))
    pipe = SCMPipeline(unet=network, scheduler=scheduler or TrigFlowScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, steps=2, n=3) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(i) for i in range(n)]
    return pipe(
        batch_size=n, num_inference_steps=steps, class_labels=list(range(n)), generator=generators, output_type="pt"
    ).images


# ---------------------------------------------------------------------------------------------------------------------
# Loading by Hub id


def test_student_loads_by_hub_id_offline_and_samples_identically(hub_cache, tmp_path):
    original = tiny_student()
    original.save_pretrained(tmp_path / "student")
    snapshot = put_in_cache(hub_cache, "org/name", tmp_path / "student", COMMIT_A)

    loaded = SCMPipeline.from_pretrained("org/name")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.unet, SCMUNet2DModel) and isinstance(loaded.scheduler, TrigFlowScheduler)
    assert Path(SCMPipeline.download("org/name")) == snapshot
    for steps in (1, 2):
        assert torch.equal(sample(loaded, steps), sample(original, steps))

    # diffusers' own downloader refuses these components for a repo id (the reason SCMPipeline.download exists)
    from diffusers import DiffusionPipeline

    with pytest.raises(ValueError, match="diffusers_scm"):
        DiffusionPipeline.download("org/name")


def test_revision_cache_dir_and_local_files_only(hub_cache, tmp_path, monkeypatch):
    first, second = tiny_student(seed=0), tiny_student(seed=1)
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    put_in_cache(hub_cache, "org/name", tmp_path / "a", COMMIT_A, refs=("main",))
    put_in_cache(hub_cache, "org/name", tmp_path / "b", COMMIT_B, refs=("v2",))
    want_a, want_b = sample(first), sample(second)
    assert not torch.equal(want_a, want_b)

    assert torch.equal(sample(SCMPipeline.from_pretrained("org/name")), want_a)
    assert torch.equal(sample(SCMPipeline.from_pretrained("org/name", revision="v2")), want_b)  # a branch
    assert torch.equal(sample(SCMPipeline.from_pretrained("org/name", revision=COMMIT_B)), want_b)  # a commit
    with pytest.raises(OSError, match=r"not in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        SCMPipeline.from_pretrained("org/name", revision="v3")
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 1.2])
    with torch.no_grad():
        by_revision = load_teacher("org/name", revision="v2")(x, t, class_labels=torch.tensor([1, 2]))
        assert torch.equal(by_revision, load_teacher(str(tmp_path / "b"))(x, t, class_labels=torch.tensor([1, 2])))

    # another cache, named by cache_dir; local_files_only without HF_HUB_OFFLINE
    other = tmp_path / "other-cache"
    put_in_cache(other, "org/other", tmp_path / "b", COMMIT_A)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    pipe = SCMPipeline.from_pretrained("org/other", cache_dir=str(other), local_files_only=True)
    assert torch.equal(sample(pipe), want_b)
    with pytest.raises(OSError, match="local_files_only=True"):
        SCMPipeline.from_pretrained("org/other", local_files_only=True)  # not in the default cache


def test_load_teacher_by_hub_id(hub_cache, tmp_path):
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 1.2])
    # a TrigFlow teacher saved by train_teacher.py, a DDPM pipeline, and a bare network repository
    tiny_student(seed=2, scheduler=TrigFlowODEScheduler(solver="dpmsolver++")).save_pretrained(tmp_path / "trigflow")
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(prediction_type="v_prediction")).save_pretrained(
        tmp_path / "ddpm"
    )
    tiny_unet(seed=3).save_pretrained(tmp_path / "net")
    DDPMScheduler().save_config(tmp_path / "net")
    for name, folder, parameterization, labels in [
        ("org/trigflow-teacher", "trigflow", "trigflow", {"class_labels": torch.tensor([1, 2])}),
        ("org/ddpm", "ddpm", "vp_v", {}),
        ("org/net", "net", "vp_epsilon", {}),
    ]:
        put_in_cache(hub_cache, name, tmp_path / folder, COMMIT_A)
        by_id, local = load_teacher(name), load_teacher(str(tmp_path / folder))
        assert by_id.parameterization.name == parameterization == local.parameterization.name
        with torch.no_grad():
            assert torch.equal(by_id(x, t, **labels), local(x, t, **labels))
    with pytest.raises(OSError, match="not in the local Hugging Face cache"):
        load_teacher("org/missing")


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"hub_test_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class HubRecorder:
    """Replaces the HTTP calls of `HfApi` (create_repo, create_branch, create_commit) and records what they get."""

    def __init__(self, monkeypatch, namespace="me", remote_files=(".gitattributes",)):
        self.repos, self.commits = [], []
        recorder = self

        def list_repo_files(api, repo_id, *, revision=None, **kwargs):
            return list(remote_files)

        def create_repo(api, repo_id, *, private=False, exist_ok=False, **kwargs):
            full = repo_id if "/" in repo_id else f"{namespace}/{repo_id}"
            recorder.repos.append({"repo_id": full, "private": private, "exist_ok": exist_ok, "token": api.token})
            return RepoUrl(f"https://huggingface.co/{full}")

        def create_branch(api, repo_id, *, branch, exist_ok=False, **kwargs):
            recorder.repos.append({"repo_id": repo_id, "branch": branch})

        def create_commit(api, repo_id, operations, *, commit_message, revision=None, create_pr=False, **kwargs):
            adds = [op for op in operations if isinstance(op, CommitOperationAdd)]
            files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in adds}
            recorder.commits.append(
                {
                    "repo_id": repo_id,
                    "files": files,
                    "deleted": [op.path_in_repo for op in operations if isinstance(op, CommitOperationDelete)],
                    "message": commit_message,
                    "revision": revision,
                    "token": api.token,
                }
            )
            return types.SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}")

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        monkeypatch.setattr(HfApi, "list_repo_files", list_repo_files)


def test_distill_with_teacher_hub_id_writes_card_and_pushes_pipeline(hub_cache, tmp_path, monkeypatch):
    teacher = tiny_student(seed=4, scheduler=TrigFlowODEScheduler(solver="dpmsolver++"))
    teacher.save_pretrained(tmp_path / "teacher")
    put_in_cache(hub_cache, "org/teacher", tmp_path / "teacher", COMMIT_A)
    hub = HubRecorder(monkeypatch)
    distill = _load_script("distill")
    common = [
        "--resolution", "8", "--train_batch_size", "4", "--max_train_steps", "2", "--checkpointing_steps", "1",
        "--validation_steps", "2", "--num_validation_images", "2", "--tangent_warmup_steps", "1",
        "--report_to", "none",
    ]  # fmt: skip
    local_out, hub_out = tmp_path / "from-folder", tmp_path / "from-hub"
    distill.main(["--teacher", str(tmp_path / "teacher"), "--output_dir", str(local_out), *common])
    distill.main(
        ["--teacher", "org/teacher", "--output_dir", str(hub_out), *common]
        + ["--push_to_hub", "--hub_model_id", "digits-student", "--hub_token", "hf_secret", "--hub_private_repo"]
    )
    with pytest.raises(ValueError, match="--push_at_checkpoints uploads to the Hub: add --push_to_hub"):
        distill.main(
            ["--teacher", "org/teacher", "--output_dir", str(tmp_path / "x"), *common, "--push_at_checkpoints"]
        )

    # the teacher loaded by Hub id trains the same student as the teacher loaded from its folder
    weights = [load_file(out / "unet" / "diffusion_pytorch_model.safetensors") for out in (local_out, hub_out)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    # the repository was created before training, then one commit uploaded exactly the pipeline and its card
    assert hub.repos[0] == {"repo_id": "me/digits-student", "private": True, "exist_ok": True, "token": "hf_secret"}
    assert len(hub.commits) == 1 and hub.commits[0]["repo_id"] == "me/digits-student"
    uploaded = hub.commits[0]["files"]
    assert sorted(uploaded) == [
        "README.md",
        "model_index.json",
        "sample_grid.png",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    assert {"checkpoint-1", "checkpoint-2", "samples", "loss_log.jsonl", "training_args.json"} <= set(
        os.listdir(hub_out)
    )
    assert all(uploaded[f] == (hub_out / f).read_bytes() for f in uploaded)
    card = ModelCard(uploaded["README.md"].decode())
    assert card.data.base_model == "org/teacher" and "scd" in card.data.tags
    assert 'SCMPipeline.from_pretrained("me/digits-student")' in card.text
    # the token is neither in the card nor in the recorded arguments
    assert "hf_secret" not in card.content and "hf_secret" not in (hub_out / "training_args.json").read_text()
    # the run without --push_to_hub still wrote a card, for its folder
    assert f'SCMPipeline.from_pretrained("{local_out}")' in (local_out / "README.md").read_text()


def test_push_at_checkpoints_uploads_each_checkpoints_ema_pipeline(tmp_path, monkeypatch):
    """--push_at_checkpoints: one commit per checkpoint with that step's EMA pipeline and card, then the final one."""
    teacher = tiny_student(seed=4, scheduler=TrigFlowODEScheduler(solver="dpmsolver++"))
    teacher.save_pretrained(tmp_path / "teacher")
    hub = HubRecorder(monkeypatch)
    out = tmp_path / "student"
    _load_script("distill").main(
        ["--teacher", str(tmp_path / "teacher"), "--output_dir", str(out), "--resolution", "8"]
        + [
            "--train_batch_size",
            "4",
            "--max_train_steps",
            "3",
            "--checkpointing_steps",
            "1",
            "--validation_steps",
            "5",
        ]
        + ["--tangent_warmup_steps", "1", "--report_to", "none", "--learning_rate", "1e-3"]
        + ["--push_to_hub", "--hub_model_id", "org/student", "--push_at_checkpoints", "--ema_decay", "0.5"]
    )
    messages = [c["message"] for c in hub.commits]
    assert messages[:3] == [f"Checkpoint: the EMA pipeline after {k} training steps" for k in (1, 2, 3)]
    assert len(hub.commits) == 4 and "after 3 training steps" in messages[3]
    files = [sorted(c["files"]) for c in hub.commits]
    pipeline = ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json"]
    pipeline.append("unet/diffusion_pytorch_model.safetensors")
    assert files[0] == files[1] == files[2] == sorted(["README.md", *pipeline])
    assert files[3] == sorted(["README.md", "sample_grid.png", *pipeline])
    # each checkpoint commit holds that step's EMA weights (they change every step), the last one the final weights
    weights = [load(c["files"]["unet/diffusion_pytorch_model.safetensors"]) for c in hub.commits]
    for a, b in zip(weights[:2], weights[1:3]):
        assert max((a[k] - b[k]).abs().max().item() for k in a) > 0
    assert all(torch.equal(weights[2][k], weights[3][k]) for k in weights[3])
    card = ModelCard(hub.commits[1]["files"]["README.md"].decode())
    assert 'SCMPipeline.from_pretrained("org/student")' in card.text and " for 2 steps" in card.text
    # the temporary upload folders are gone; the checkpoints themselves were never uploaded
    assert not [d for d in os.listdir(out) if d.startswith(".hub-checkpoint")]
    assert not any(f.startswith("checkpoint-") for c in hub.commits for f in c["files"])


def test_failed_checkpoint_push_does_not_end_training(tmp_path, monkeypatch, caplog):
    teacher = tiny_student(seed=4, scheduler=TrigFlowODEScheduler(solver="dpmsolver++"))
    teacher.save_pretrained(tmp_path / "teacher")
    hub = HubRecorder(monkeypatch)
    record = HfApi.create_commit

    def flaky(api, repo_id, operations, *, commit_message, **kwargs):
        if commit_message.startswith("Checkpoint"):
            raise OSError("connection reset")
        return record(api, repo_id, operations, commit_message=commit_message, **kwargs)

    monkeypatch.setattr(HfApi, "create_commit", flaky)
    out = tmp_path / "student"
    with caplog.at_level("WARNING"):
        _load_script("distill").main(
            ["--teacher", str(tmp_path / "teacher"), "--output_dir", str(out), "--resolution", "8"]
            + ["--train_batch_size", "4", "--max_train_steps", "2", "--checkpointing_steps", "1"]
            + ["--validation_steps", "5", "--tangent_warmup_steps", "1", "--report_to", "none"]
            + ["--push_to_hub", "--hub_model_id", "org/student", "--push_at_checkpoints"]
        )
    assert "Could not push the step-1 pipeline to org/student (OSError: connection reset)" in caplog.text
    assert [c["message"] for c in hub.commits] == ["Upload the pipeline after 2 training steps"]
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-2"]
    assert not [d for d in os.listdir(out) if d.startswith(".hub-checkpoint")]


def test_train_teacher_card_and_push(hub_cache, tmp_path, monkeypatch):
    hub = HubRecorder(monkeypatch)
    out = tmp_path / "digits-teacher"
    _load_script("train_teacher").main(
        ["--preset", "tiny", "--class_conditional", "--resolution", "8", "--train_batch_size", "4"]
        + ["--max_train_steps", "1", "--validation_steps", "5", "--checkpointing_steps", "5", "--report_to", "none"]
        + ["--validation_nfe", "1", "2", "--output_dir", str(out), "--push_to_hub", "--hub_model_id", "org/teacher"]
    )
    assert [c["repo_id"] for c in hub.commits] == ["org/teacher"]
    assert "README.md" in hub.commits[0]["files"] and "sample_grid.png" in hub.commits[0]["files"]
    card = ModelCard.load(out / "README.md")
    assert "trigflow" in card.data.tags and "consistency-model" not in card.data.tags
    assert "num_inference_steps=32" in card.text and "Rows: 1 step, 2 steps." in card.text
    assert "--teacher org/teacher" in card.text


# ---------------------------------------------------------------------------------------------------------------------
# Model cards


def _student_folder(path: Path) -> SCMPipeline:
    pipe = tiny_student(seed=5)
    pipe.save_pretrained(path)
    args = {"method": "scd", "teacher": "org/teacher", "P_mean": -1.0, "tangent_warmup_steps": 10000}
    args |= {"learning_rate": 1e-4, "train_batch_size": 8, "dataset_name": "digits", "hub_token": None}
    (path / "training_args.json").write_text(json.dumps(args))
    summary = {"steps": 2000, "skipped_steps": 1, "num_processes": 2, "device_type": "cuda"}
    summary |= {"device_name": "NVIDIA H100 80GB HBM3", "mixed_precision": "bf16"}
    (path / "training_summary.json").write_text(json.dumps(summary))
    save_sample_grid(pipe, str(path / "sample_grid.png"), (1, 2), num_images=4)
    return pipe


RESULTS = {
    "rows": [
        {"model": "student", "pipeline": "s", "sampler": "consistency", "steps": 1, "nfe": 1, "fd_digits": 3.25,
         "paired_rmse": 0.125, "sec_per_image": 0.001},
        {"model": "teacher", "pipeline": "t", "sampler": "ode-heun", "steps": 16, "nfe": 31, "fd_digits": 1.5,
         "paired_rmse": None, "sec_per_image": 0.01},
        {"model": "student", "pipeline": "s", "sampler": "consistency", "steps": 2, "nfe": 2, "fd_digits": 2.5,
         "paired_rmse": 0.0625, "sec_per_image": 0.002},
    ],
    "classifier_accuracy": 0.983,
    "num_samples": 1000,
}  # fmt: skip


def test_model_card_metadata_table_and_snippet_runs(hub_cache, tmp_path):
    folder = tmp_path / "student"
    pipe = _student_folder(folder)
    (folder / "results.json").write_text(json.dumps(RESULTS))  # found in the folder
    save_model_card(str(folder), repo_id="org/name")
    card = ModelCard.load(folder / "README.md")

    data = card.data
    assert data.library_name == "diffusers" and data.pipeline_tag == "unconditional-image-generation"
    assert data.license == "apache-2.0" and data.base_model == "org/teacher"
    assert {"diffusers", "diffusers-scm", "consistency-model", "scd"} <= set(data.tags)
    metrics = {(r.metric_type, r.metric_name): r.metric_value for r in data.eval_results}
    assert metrics == {
        ("fd_digits", "FD-digits (1 NFE)"): 3.25,
        ("paired_rmse", "paired RMSE (1 NFE)"): 0.125,
        ("fd_digits", "FD-digits (2 NFE)"): 2.5,
        ("paired_rmse", "paired RMSE (2 NFE)"): 0.0625,
    }
    assert all(
        r.task_type == "unconditional-image-generation" and r.dataset_type == "digits" for r in data.eval_results
    )

    text = card.text
    assert "| model | sampler | steps | NFE | FD-digits | paired RMSE | s / image |" in text
    rows = [line for line in text.splitlines() if line.startswith(("| teacher", "| student"))]
    assert rows == [
        "| teacher | ode-heun | 16 | 31 | 1.5 | - | 1.00e-02 |",
        "| student | consistency | 1 | 1 | 3.25 | 0.125 | 1.00e-03 |",
        "| student | consistency | 2 | 2 | 2.5 | 0.0625 | 2.00e-03 |",
    ]
    assert "98.3% held-out accuracy" in text
    assert "[org/teacher](https://huggingface.co/org/teacher)" in text
    assert "sCD for 2000 steps (1 skipped for non-finite losses) on 2 x NVIDIA H100 80GB HBM3, bf16" in text
    assert "| `P_mean` | -1 |" in text and "| `tangent_warmup_steps` | 10000 |" in text
    assert "hub_token" not in text
    assert "![Samples](sample_grid.png)" in text and "Rows: 1 step, 2 steps." in text
    assert "The training arguments" not in text and "No evaluation results" not in text

    # the usage snippet, as the card shows it, runs against the cache in a fresh process
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    put_in_cache(hub_cache, "org/name", folder, COMMIT_A)
    res = subprocess.run(
        [sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=os.environ
    )
    assert res.returncode == 0, res.stderr[-3000:]
    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    expected = pipe(batch_size=4, num_inference_steps=2, class_labels=[0, 1, 2, 3], generator=generators).images[0]
    saved = np.asarray(PIL.Image.open(tmp_path / "sample.png"), dtype=np.int16)
    assert np.abs(saved - np.asarray(expected, dtype=np.int16)).max() <= 1


def test_card_without_records_and_explicit_results(tmp_path):
    folder = tmp_path / "bare"
    tiny_student(num_classes=None).save_pretrained(folder)
    text = render_model_card(str(folder)).text
    assert "No training record" in text and "The training arguments (`training_args.json`) were not recorded" in text
    assert "No evaluation results were given" in text and "No sample grid" in text
    assert f'SCMPipeline.from_pretrained("{folder}")' in text and "class_labels" not in text
    card = render_model_card(str(folder), repo_id="org/bare", eval_results=RESULTS, license="cc-by-nc-4.0")
    assert card.data.license == "cc-by-nc-4.0" and card.data.base_model is None
    assert len(card.data.eval_results) == 4 and card.data.model_name == "bare"
    with pytest.raises(ValueError, match="no evaluation rows"):
        render_model_card(str(folder), eval_results={"rows": []})
    with pytest.raises(ValueError, match=r"lacks \['nfe'\]"):
        render_model_card(str(folder), eval_results={"rows": [{"model": "student"}]})


def test_templates_ship_in_the_wheel(tmp_path):
    """A non-editable install (a built wheel, unpacked) finds the templates inside the package."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = tmp_path.glob("diffusers_scm-*.whl")
    installed = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        assert {"diffusers_scm/model_cards/student_card.md", "diffusers_scm/model_cards/teacher_card.md"} <= set(
            z.namelist()
        )
        z.extractall(installed)
    folder = tmp_path / "student"
    _student_folder(folder)
    code = (
        "import diffusers_scm, sys; from diffusers_scm.hub import render_model_card\n"
        f"assert diffusers_scm.__file__.startswith({str(installed)!r}), diffusers_scm.__file__\n"
        f"print(render_model_card({str(folder)!r}, repo_id='org/name').data.base_model)"
    )
    env = {**os.environ, "PYTHONPATH": str(installed)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "org/teacher"


# ---------------------------------------------------------------------------------------------------------------------
# Uploads


def test_push_sends_exactly_the_pipeline_folder(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    _student_folder(folder)
    save_model_card(str(folder), repo_id="org/name")
    for extra in ("checkpoint-500/model.safetensors", "samples/step-0000500-1step.png", "logs/events.out", "x.txt"):
        (folder / extra).parent.mkdir(parents=True, exist_ok=True)
        (folder / extra).write_text("not published")
    (folder / "unet" / ".DS_Store").write_text("")
    # an earlier upload left a .bin weight in unet/; other files of the repository are not the pipeline's to delete
    remote = [".gitattributes", "README.md", "unet/config.json", "unet/diffusion_pytorch_model.bin", "eval/r.json"]
    hub = HubRecorder(monkeypatch, remote_files=remote)
    push_pipeline_to_hub(str(folder), "org/name", token="hf_x", private=True, commit_message="v1", revision="dev")

    assert hub.repos == [
        {"repo_id": "org/name", "private": True, "exist_ok": True, "token": "hf_x"},
        {"repo_id": "org/name", "branch": "dev"},
    ]
    (commit,) = hub.commits
    assert commit["message"] == "v1" and commit["revision"] == "dev" and commit["token"] == "hf_x"
    expected = [
        "README.md",
        "model_index.json",
        "sample_grid.png",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    assert sorted(commit["files"]) == expected == sorted(pipeline_files(str(folder)))
    assert all(commit["files"][f] == (folder / f).read_bytes() for f in expected)
    assert commit["deleted"] == ["unet/diffusion_pytorch_model.bin"]
    push_pipeline_to_hub(str(folder), "org/name", commit_message="v2", delete_stale=False)
    assert hub.commits[1]["deleted"] == [] and sorted(hub.commits[1]["files"]) == expected


def test_command_line_renders_card_with_evaluation_and_pushes(tmp_path, monkeypatch, capsys):
    from diffusers_scm.hub import main

    folder = tmp_path / "my-student"
    _student_folder(folder)
    os.remove(folder / "sample_grid.png")
    (tmp_path / "results.json").write_text(json.dumps(RESULTS))
    hub = HubRecorder(monkeypatch, namespace="me")
    main([str(folder), "--eval_results", str(tmp_path / "results.json"), "--sample_steps", "1", "--push_to_hub"])
    card = ModelCard.load(folder / "README.md")
    assert len(card.data.eval_results) == 4 and 'SCMPipeline.from_pretrained("me/my-student")' in card.text
    assert "Rows: 1 step." in card.text
    assert [c["repo_id"] for c in hub.commits] == ["me/my-student"]
    assert {"README.md", "sample_grid.png"} <= set(hub.commits[0]["files"])
    assert "results.json" not in hub.commits[0]["files"]
    assert "Pushed to https://huggingface.co/me/my-student/commit/" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# Plain diffusers, and errors


def test_plain_diffusion_pipeline_loading_as_the_readme_documents(hub_cache, tmp_path):
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"<!-- hub:plain-diffusers -->\s*```python\n(.*?)```", readme, re.S).group(1)
    assert "custom_pipeline=CUSTOM_PIPELINE" in snippet
    pipe = tiny_student(seed=6)
    pipe.save_pretrained(tmp_path / "student")
    put_in_cache(hub_cache, "your-org/your-student", tmp_path / "student", COMMIT_A)
    expected = sample(pipe)
    check = (
        "\nimport torch\n"
        "assert type(pipe).__name__ == 'SCMPipeline', type(pipe)\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "g = [torch.Generator().manual_seed(i) for i in range(3)]\n"
        "out = pipe(batch_size=3, num_inference_steps=2, class_labels=[0, 1, 2], generator=g, output_type='pt')\n"
        f"torch.save(out.images, {str(tmp_path / 'out.pt')!r})\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", snippet + check], capture_output=True, text=True, timeout=300, env=os.environ
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)

    # what the README says of DiffusionPipeline.from_pretrained without the pipeline code
    from diffusers import DiffusionPipeline, UNet2DModel

    with pytest.raises(AttributeError, match="has no attribute SCMPipeline"):
        DiffusionPipeline.from_pretrained(tmp_path / "student")
    # and of a network in a diffusers class, loaded by diffusers alone
    SCMPipeline(unet=tiny_unet(seed=7), scheduler=TrigFlowScheduler()).save_pretrained(tmp_path / "unet-student")
    put_in_cache(hub_cache, "your-org/unet-student", tmp_path / "unet-student", COMMIT_A)
    unet = UNet2DModel.from_pretrained("your-org/unet-student", subfolder="unet")
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), tiny_unet(seed=7).state_dict().values()))


def _edit_index(folder: Path, **entries):
    index = json.loads((folder / "model_index.json").read_text())
    index.update(entries)
    (folder / "model_index.json").write_text(json.dumps(index))


def test_clear_errors(hub_cache, tmp_path):
    # not a pipeline: a bare network repository
    tiny_unet().save_pretrained(tmp_path / "net")
    put_in_cache(hub_cache, "org/net", tmp_path / "net", COMMIT_A)
    with pytest.raises(ValueError, match=r"org/net is not a diffusers pipeline: it has no model_index.json.*config"):
        SCMPipeline.from_pretrained("org/net")
    # another pipeline class
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    put_in_cache(hub_cache, "org/ddpm", tmp_path / "ddpm", COMMIT_A)
    with pytest.raises(ValueError, match=r"holds a 'DDPMPipeline' pipeline, not a diffusers-scm SCMPipeline"):
        SCMPipeline.from_pretrained("org/ddpm")
    with pytest.raises(ValueError, match="DDPMPipeline"):
        SCMPipeline.from_pretrained(tmp_path / "ddpm")
    # a missing component folder, by Hub id and as a local folder
    tiny_student().save_pretrained(tmp_path / "partial")
    shutil.rmtree(tmp_path / "partial" / "scheduler")
    put_in_cache(hub_cache, "org/partial", tmp_path / "partial", COMMIT_A)
    for source in ("org/partial", str(tmp_path / "partial")):
        with pytest.raises(ValueError, match=r"lists the component 'scheduler'.*has no scheduler/ folder"):
            SCMPipeline.from_pretrained(source)
    # missing weights
    tiny_student().save_pretrained(tmp_path / "noweights")
    os.remove(tmp_path / "noweights" / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="has no weights in unet/"):
        SCMPipeline.from_pretrained(tmp_path / "noweights")
    # a network class from a library that is not installed, or that the library does not have
    tiny_student().save_pretrained(tmp_path / "exotic")
    _edit_index(tmp_path / "exotic", unet=["fancy_networks", "FancyUNet"])
    put_in_cache(hub_cache, "org/exotic", tmp_path / "exotic", COMMIT_A)
    with pytest.raises(ImportError, match=r"library 'fancy_networks' is not installed.*pip install fancy-networks"):
        SCMPipeline.from_pretrained("org/exotic")
    with pytest.raises(ImportError, match="pip install fancy-networks"):
        download_pipeline("org/exotic")
    _edit_index(tmp_path / "exotic", unet=["diffusers_scm", "SCMUNet3DModel"])
    with pytest.raises(ImportError, match=r"diffusers_scm.SCMUNet3DModel`, which the installed diffusers_scm"):
        SCMPipeline.from_pretrained(tmp_path / "exotic")
    # not in the cache, with the Hub switched off
    with pytest.raises(OSError, match=r"org/unknown is not in the local Hugging Face cache.*HF_HUB_OFFLINE is set"):
        SCMPipeline.from_pretrained("org/unknown")
    # a teacher repository with neither a pipeline nor a network
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("hello")
    put_in_cache(hub_cache, "org/notes", tmp_path / "notes", COMMIT_A)
    with pytest.raises(ValueError, match=r"neither a diffusers pipeline folder.*notes.txt"):
        load_teacher("org/notes")


def test_a_card_lists_its_own_methods_hyperparameters_only():
    from diffusers_scm.hub import method_hyperparameters

    args = {
        "method": "scd",
        "learning_rate": 1e-4,
        "tangent_warmup_steps": 100,
        "jvp_backend": "auto",
        "consistency_distance": "pseudo_huber",
        "huber_c": 0.03,
        "dt_q": 2.0,
        "tcm_objective": "continuous",
        "tcm_stage1_method": "scd",
        "tcm_boundary_prob": 0.25,
        "stage2_learning_rate": 5e-5,
        "dmd_weight": 0.0,
        "dmd_P_mean": -0.8,
        "lora_rank": None,
        "lora_alpha": 8,
        "output_dir": "out",
    }
    names = lambda method, **changed: [k for k, _ in method_hyperparameters({**args, **changed}, method)]  # noqa: E731
    assert names("scd") == ["method", "learning_rate", "tangent_warmup_steps", "jvp_backend"]
    assert names("cd") == ["method", "learning_rate", "consistency_distance", "huber_c", "dt_q"]
    tcm = names("tcm")  # continuous Stage 2 after an sCD Stage 1: TCM's and the continuous flags
    assert "tcm_boundary_prob" in tcm and "stage2_learning_rate" in tcm and "tangent_warmup_steps" in tcm
    assert "huber_c" not in tcm and "dt_q" not in tcm
    assert "huber_c" in names("tcm", tcm_objective="discrete")  # the paper's discrete Stage 2
    on = names("scd", dmd_weight=0.5, lora_rank=4)  # the regularizer's and LoRA's flags once switched on
    assert {"dmd_weight", "dmd_P_mean", "lora_rank", "lora_alpha"} <= set(on)
