"""Errors at the edges: local paths that do not exist, damaged JSON, damaged images and checkpoints, pipeline
arguments out of range, non-finite times and network outputs. Each error names the problem and the fix."""

import ast
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_unet
from huggingface_hub import constants

from diffusers_scm import SCMPipeline, TrigFlowODEScheduler, TrigFlowScheduler
from diffusers_scm.training import load_teacher
from diffusers_scm.training.data.images import DigitsDataset, load_image_dataset
from diffusers_scm.training.machinery.checkpointing import load_checkpoint, save_checkpoint
from diffusers_scm.utils import read_json


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty Hugging Face cache with the Hub switched off, so that nothing here reaches the network."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _student(folder: Path) -> Path:
    pipe = SCMPipeline(unet=tiny_unet(), scheduler=TrigFlowScheduler())
    pipe.save_pretrained(folder)
    return folder


def _pipe(unet=None) -> SCMPipeline:
    pipe = SCMPipeline(unet=unet if unet is not None else tiny_unet(), scheduler=TrigFlowScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------------------------
# 3. A local path that does not exist is named, not sent to the Hub as a repository id


@pytest.mark.parametrize(
    "path",
    ["/path/that/does/not/exist", "./missing-student", "../missing-student", "~/missing-student-xyz", "runs/a/b"]
    + ["missing-student/", "runs\\student"],
)
def test_missing_local_path_is_named(path, offline):
    expected = rf"{re.escape(path)} does not exist \(a local folder was expected; a Hub id looks like 'org/name'\)"
    with pytest.raises(FileNotFoundError, match=expected):
        load_teacher(path)
    with pytest.raises(FileNotFoundError, match=expected):
        SCMPipeline.from_pretrained(path)


def test_local_paths_and_hub_ids_are_told_apart(tmp_path, offline, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):  # a pathlib.Path is always local
        SCMPipeline.from_pretrained(tmp_path / "missing")
    _student(tmp_path / "student")
    monkeypatch.setenv("HOME", str(tmp_path))  # "~" is expanded
    assert isinstance(SCMPipeline.from_pretrained("~/student"), SCMPipeline)
    assert load_teacher("~/student").parameterization.name == "trigflow"
    with pytest.raises(NotADirectoryError, match=r"model_index.json is a file, not a folder"):
        load_teacher(str(tmp_path / "student" / "model_index.json"))
    # "org/name" is still a Hub id: offline and not cached, the Hub's own error
    with pytest.raises(OSError, match="not in the local Hugging Face cache") as info:
        SCMPipeline.from_pretrained("org/name")
    assert not isinstance(info.value, FileNotFoundError)


# ---------------------------------------------------------------------------------------------------------------------
# 4. Damaged JSON is named, with what to do


@pytest.mark.parametrize("damaged", ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json"])
def test_damaged_json_names_the_file(tmp_path, damaged):
    folder = _student(tmp_path / "student")
    path = folder / damaged
    path.write_text(path.read_text()[:20])  # cut off mid-write
    expected = rf"{re.escape(str(path))} is not valid JSON .*Save the pipeline again .*download it again"
    with pytest.raises(ValueError, match=expected):
        SCMPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match=expected):
        load_teacher(str(folder))


def test_read_json(tmp_path):
    (tmp_path / "ok.json").write_text('{"a": 1}')
    assert read_json(str(tmp_path / "ok.json")) == {"a": 1}
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"binary.json is not a UTF-8 text file.*Save the pipeline again"):
        read_json(str(tmp_path / "binary.json"))
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(ValueError, match=r"empty.json is not valid JSON \(Expecting value at line 1, column 1\)"):
        read_json(str(tmp_path / "empty.json"), fix="Write it again.")


# ---------------------------------------------------------------------------------------------------------------------
# 5. Damaged images are found when the folder is loaded, named, and optionally skipped


def _image_folder(root: Path) -> dict[str, Path]:
    """Two class folders of 12x12 PNGs, with a truncated PNG and a file that is no image at all."""
    rng = np.random.default_rng(0)
    paths = {}
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            paths[f"{label}{i}"] = root / label / f"{i}.png"
            PIL.Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(paths[f"{label}{i}"])
    data = paths["dog2"].read_bytes()
    paths["truncated"] = root / "dog" / "truncated.png"
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["garbage"] = root / "cat" / "garbage.jpg"
    paths["garbage"].write_bytes(b"not an image" * 10)
    return paths


def test_damaged_images_are_named_before_training(tmp_path):
    paths = _image_folder(tmp_path / "images")
    with pytest.raises(ValueError) as info:
        load_image_dataset(str(tmp_path / "images"), resolution=8, channels=3)
    message = str(info.value)
    assert str(paths["garbage"]) in message and str(paths["truncated"]) in message
    assert "2 of the 8 images" in message and "--skip_bad_images" in message
    # one damaged file: its PIL error is given
    paths["garbage"].unlink()
    with pytest.raises(ValueError, match=rf"Cannot read the image {re.escape(str(paths['truncated']))} \(OSError: .*"):
        load_image_dataset(str(tmp_path / "images"), resolution=8, channels=3)


def test_skip_bad_images_counts_and_warns(tmp_path, caplog):
    paths = _image_folder(tmp_path / "images")
    with caplog.at_level(logging.WARNING, logger="diffusers_scm.training.data"):
        data = load_image_dataset(str(tmp_path / "images"), resolution=8, channels=3, skip_bad_images=True)
    assert len(data) == 6 and data.num_skipped == 2
    assert sorted(data.skipped) == sorted([str(paths["garbage"]), str(paths["truncated"])])
    assert sorted(int(data[i]["class_labels"]) for i in range(len(data))) == [0, 0, 0, 1, 1, 1]
    assert data[0]["pixel_values"].shape == (3, 8, 8)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Skipping 2 of the 8 images" in warnings[0].getMessage()
    assert str(paths["garbage"]) in warnings[0].getMessage()
    # an image damaged after loading is named by __getitem__
    shutil.copyfile(paths["garbage"], paths["cat0"])
    index = next(i for i, (path, _) in enumerate(data.items) if path == str(paths["cat0"]))
    with pytest.raises(ValueError, match=rf"Cannot read the image {re.escape(str(paths['cat0']))}.*--skip_bad_images"):
        data[index]
    # a folder without class folders; the digits skip nothing
    dogs = load_image_dataset(str(tmp_path / "images" / "dog"), 8, 3, skip_bad_images=True)
    assert len(dogs) == 3 and dogs.skipped == [str(paths["truncated"])]
    assert DigitsDataset(8, "test").num_skipped == 0


def test_all_images_damaged(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(ValueError, match=r"None of the 1 images in .*bad can be read"):
        load_image_dataset(str(tmp_path / "bad"), 8, 1, skip_bad_images=True)


# ---------------------------------------------------------------------------------------------------------------------
# 7, 11. Pipeline arguments and non-finite values


@pytest.mark.parametrize("batch_size", [0, -2, 1.5, True, "4"])
def test_batch_size_must_be_a_positive_integer(batch_size):
    with pytest.raises(ValueError, match=r"`batch_size` must be a positive integer, got"):
        _pipe()(batch_size=batch_size, output_type="latent")


@pytest.mark.parametrize("steps", [0, -1, 2.0])
def test_num_inference_steps_must_be_a_positive_integer(steps):
    with pytest.raises(ValueError, match=r"`num_inference_steps` must be a positive integer, got"):
        _pipe()(num_inference_steps=steps, output_type="latent")
    # explicit times set the steps: num_inference_steps is then not used
    assert _pipe()(timesteps=[1.5, 1.0], num_inference_steps=None, output_type="latent").images.shape == (1, 1, 8, 8)


@pytest.mark.parametrize("timesteps", [[float("nan")], [1.5, float("nan")], torch.tensor([float("inf"), 1.0])])
def test_non_finite_timesteps_are_rejected(timesteps):
    with pytest.raises(ValueError, match=r"`timesteps` must be finite"):
        _pipe()(timesteps=timesteps, output_type="latent")
    for scheduler in (TrigFlowScheduler(), TrigFlowODEScheduler()):
        with pytest.raises(ValueError, match=r"`timesteps` must be finite"):
            scheduler.set_timesteps(timesteps=timesteps)


def test_non_finite_network_output_warns_once(caplog):
    unet = tiny_unet()
    with torch.no_grad():
        unet.conv_out.weight[0, 0, 0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="diffusers_scm.pipelines.pipeline_scm"):
        images = _pipe(unet)(batch_size=2, num_inference_steps=2, output_type="latent").images
    assert torch.isnan(images).all()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "NaN or infinite at step 1 of 2" in warnings[0] and "for 2 of 2 samples" in warnings[0]

    # one bad sample of three: counted, and the other two stay finite
    caplog.clear()
    latents = torch.randn(3, 1, 8, 8)
    latents[1, 0, 0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="diffusers_scm.pipelines.pipeline_scm"):
        images = _pipe()(batch_size=3, latents=latents, output_type="latent").images
    assert torch.isfinite(images[[0, 2]]).all() and torch.isnan(images[1]).all()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "at step 1 of 1" in warnings[0] and "for 1 of 3 samples" in warnings[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffusers_scm.pipelines.pipeline_scm"):
        _pipe()(batch_size=2, num_inference_steps=2, output_type="latent")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ---------------------------------------------------------------------------------------------------------------------
# 8. A damaged checkpoint names the file and the previous checkpoint


class _FakeAccelerator:
    process_index, is_main_process, scaler = 0, True, None

    def unwrap_model(self, m):
        return m

    def wait_for_everyone(self):
        pass


def test_damaged_checkpoint_names_file_and_previous_checkpoint(tmp_path):
    acc, model = _FakeAccelerator(), torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in (100, 200, 300):
        save_checkpoint(acc, str(tmp_path), step, {"student": model}, opt)
    (tmp_path / "checkpoint-300" / "optimizer.pt").write_bytes(b"garbage")
    previous = os.path.join(str(tmp_path), "checkpoint-200")
    with pytest.raises(ValueError) as info:
        load_checkpoint(acc, str(tmp_path / "checkpoint-300"), {"student": model}, opt)
    message = str(info.value)
    assert str(tmp_path / "checkpoint-300" / "optimizer.pt") in message and "corrupted" in message
    assert f"resume the previous one with --resume_from_checkpoint {previous}" in message
    # a missing file names the previous checkpoint too
    os.remove(tmp_path / "checkpoint-200" / "training_state.json")
    with pytest.raises(
        ValueError, match=r"missing \['training_state.json'\].*--resume_from_checkpoint .*checkpoint-100"
    ):
        load_checkpoint(acc, previous, {"student": model}, opt)
    # the first checkpoint has none before it
    (tmp_path / "checkpoint-100" / "student.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"student.safetensors failed .*No earlier checkpoint is beside it"):
        load_checkpoint(acc, str(tmp_path / "checkpoint-100"), {"student": model}, opt)


# ---------------------------------------------------------------------------------------------------------------------
# 10. No pickle: every torch.load passes weights_only=True


def test_every_torch_load_is_weights_only():
    calls = []
    for path in sorted([*(ROOT / "src").rglob("*.py"), *(ROOT / "examples").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            func = node.func if isinstance(node, ast.Call) else None
            if isinstance(func, ast.Attribute) and func.attr == "load" and ast.unparse(func.value) == "torch":
                safe = any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                )
                calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", safe))
    assert calls, "no torch.load found: the scan is broken"
    assert [where for where, safe in calls if not safe] == []
