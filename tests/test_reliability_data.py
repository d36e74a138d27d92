"""Training data at the edges: the latent cache of a text-to-image teacher (an interrupted write, a damaged folder, a
cache made with other settings than the run's) and the captions of a `metadata.jsonl` (bytes that are not UTF-8, rows
without a caption, null captions). Each error names the folder or the file and line, and the fix. Tiny pipelines."""

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script
from PIL import Image
from t2i_pipelines import IMAGE_SIZE, VAE_SCALE_FACTOR, save_tiny_pipeline

from diffusers_scm.training.data import latent_cache as text_to_image
from diffusers_scm.training.data.captions import load_text_image_dataset


PROMPTS = ["a red fox", "a bowl of soup", "a blue bird", "a small cat"]
COMMON = [
    "--train_batch_size", "2", "--tangent_warmup_steps", "2", "--report_to", "none", "--num_validation_images", "1",
    "--validation_prompts", "a red fox", "--seed", "3", "--max_train_steps", "1",
]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher_and_data(tmp_path_factory):
    """A tiny Stable Diffusion teacher and a captioned image folder of four images."""
    root = tmp_path_factory.mktemp("cache-inputs")
    save_tiny_pipeline("sd15", root / "sd15")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    with open(data / "metadata.jsonl", "w") as f:
        for i, prompt in enumerate(PROMPTS):
            Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(data / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": prompt}) + "\n")
    return root / "sd15", data


def _prepare(teacher, data, cache, resolution=IMAGE_SIZE):
    load_script("prepare_data").main(
        ["--teacher", str(teacher), "--dataset_name", str(data), "--resolution", str(resolution)]
        + ["--cache_dir", str(cache), "--batch_size", "4", "--device", "cpu"]
    )


class Killed(Exception):
    """Stands for the process being killed while it writes the cache."""


def test_interrupted_cache_write_keeps_the_old_cache_and_a_damaged_cache_is_refused(
    tmp_path, teacher_and_data, monkeypatch
):
    import datasets

    teacher, data = teacher_and_data
    cache = tmp_path / "cache"
    _prepare(teacher, data, cache)
    before = text_to_image.load_cache(str(cache))[0]["latents"]

    save_to_disk = datasets.Dataset.save_to_disk

    def killed_while_writing(self, path, *args, **kwargs):  # half of the Arrow file is on disk, then the kill
        save_to_disk(self, path, *args, **kwargs)
        arrow = next(Path(path).rglob("*.arrow"))
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
        raise Killed

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", killed_while_writing)
    with pytest.raises(Killed):
        _prepare(teacher, data, cache)
    monkeypatch.undo()
    data_after, _, info = text_to_image.load_cache(str(cache))  # the earlier cache, untouched
    torch.testing.assert_close(data_after["latents"], before)
    assert info["complete"] and info["num_rows"] == 4 and not (tmp_path / "cache.tmp").exists()

    # a data file that does not match cache_info.json (cut off): refused, naming the folder and the rebuild command
    arrow = next(cache.rglob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-100])
    rebuild = f"python examples/prepare_data.py --teacher {teacher} --dataset_name {data} --resolution {IMAGE_SIZE}"
    with pytest.raises(ValueError, match=rf"{re.escape(str(cache))} is incomplete or damaged: data/.*\.arrow has"):
        text_to_image.load_cache(str(cache))
    with pytest.raises(ValueError, match=re.escape(f"`{rebuild} --cache_dir {cache}`, or add --rebuild_cache")):
        text_to_image.load_cache(str(cache))
    # a cache_info.json without the completeness marker, or without a format version (an older cache): refused
    _prepare(teacher, data, cache)
    info = json.loads((cache / "cache_info.json").read_text())
    (cache / "cache_info.json").write_text(json.dumps({**info, "complete": False}))
    with pytest.raises(ValueError, match="is incomplete: its cache_info.json is not marked complete"):
        text_to_image.load_cache(str(cache))
    (cache / "cache_info.json").write_text(json.dumps({"family": info["family"], "resolution": IMAGE_SIZE}))
    with pytest.raises(ValueError, match="written by another version of diffusers-scm .*Rebuild it with"):
        text_to_image.load_cache(str(cache))
    # writing a cache replaces its whole folder: a folder holding anything else is refused
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="holds other files than a cache \\(notes.txt\\).*new or empty folder"):
        _prepare(teacher, data, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_cache_of_other_settings_is_refused_naming_the_flag_or_rebuilt(tmp_path, teacher_and_data):
    source, data = teacher_and_data
    teacher = tmp_path / "teacher"
    shutil.copytree(source, teacher)
    cache = tmp_path / "cache"
    _prepare(teacher, data, cache)
    distill = load_script("distill")
    run = ["--teacher", str(teacher), "--cache_dir", str(cache), "--dataset_name", str(data), *COMMON]

    with pytest.raises(ValueError, match=f"made with --resolution {IMAGE_SIZE}, this run has --resolution 64"):
        distill.main([*run, "--resolution", "64", "--output_dir", str(tmp_path / "refused")])
    assert not (tmp_path / "refused" / "model_index.json").exists()
    info = json.loads((cache / "cache_info.json").read_text())
    assert info["resolution"] == IMAGE_SIZE and info["dtype"] == "float32" and info["teacher"] == str(teacher)
    assert sorted(info["components"]) == ["text_encoder", "tokenizer", "vae"]
    assert (
        info["components"]["vae"]["class"] == "AutoencoderKL" and len(info["components"]["vae"]["config_sha256"]) == 64
    )
    assert info["max_sequence_length"] is None  # Stable Diffusion pads to the tokenizer's length, no argument
    expected = {**text_to_image.teacher_record(str(teacher)), "resolution": IMAGE_SIZE, "dtype": "bfloat16"}
    with pytest.raises(ValueError, match="made with --teacher_dtype float32, this run has --teacher_dtype bfloat16"):
        text_to_image.load_cache(str(cache), expected)
    vae_config = json.loads((teacher / "vae" / "config.json").read_text())
    (teacher / "vae" / "config.json").write_text(json.dumps({**vae_config, "scaling_factor": 0.5}))
    expected = {**text_to_image.teacher_record(str(teacher)), "resolution": IMAGE_SIZE, "dtype": "float32"}
    with pytest.raises(ValueError, match=f"--teacher {re.escape(str(teacher))}: its vae \\(class or config\\) differ"):
        text_to_image.load_cache(str(cache), expected)

    # --rebuild_cache writes it again with the run's settings, then trains from it
    out = tmp_path / "rebuilt"
    distill.main([*run, "--resolution", "64", "--rebuild_cache", "--output_dir", str(out)])
    rebuilt, _, info = text_to_image.load_cache(str(cache), {**expected, "resolution": 64})
    assert info["resolution"] == 64 and info["components"]["vae"] == expected["components"]["vae"]
    assert rebuilt[0]["latents"].shape[-1] == 64 // VAE_SCALE_FACTOR
    assert (out / "model_index.json").exists()


def test_metadata_rows_are_checked_when_loaded_naming_file_and_line(tmp_path, caplog):
    folder = tmp_path / "captioned"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{i}.png")
    metadata = folder / "metadata.jsonl"

    def write(*rows):
        metadata.write_bytes(b"".join(row + b"\n" for row in rows))

    row = [json.dumps({"file_name": f"{i}.png", "text": PROMPTS[i]}).encode() for i in range(3)]
    write(row[0], b'{"file_name": "1.png", "text": "caf\xe9 au lait"}', row[2])  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=rf"{re.escape(str(metadata))}, line 2, is not UTF-8 text \(byte 0xe9"):
        load_text_image_dataset(str(folder), IMAGE_SIZE)
    write(row[0], row[1], b'{"file_name": "2.png", "caption": "a small cat"}')
    with pytest.raises(ValueError, match=r"line 3, has no caption column 'text' \(its keys: \['caption', 'file_name'"):
        load_text_image_dataset(str(folder), IMAGE_SIZE)
    write(row[0], b'{"text": "a blue bird"}', row[2])
    with pytest.raises(ValueError, match="line 2, has no file_name .*although the first line names an image"):
        load_text_image_dataset(str(folder), IMAGE_SIZE)

    # null captions: the empty caption, with one warning that counts them
    write(b'{"file_name": "0.png", "text": null}', row[1], b'{"file_name": "2.png", "text": null}')
    with caplog.at_level(logging.WARNING, logger="diffusers_scm.training.data.captions"):
        dataset = load_text_image_dataset(str(folder), IMAGE_SIZE)
    assert [dataset[i]["caption"] for i in range(3)] == ["", PROMPTS[1], ""] and dataset.captions[0] == ""
    warnings = [r.getMessage() for r in caplog.records if "null" in r.getMessage()]
    assert warnings == [
        f'{metadata}: 2 of the 3 rows have "text": null (lines 1, 3); they are trained with the empty caption.'
    ]
    # the same checks for a prompt-only metadata.jsonl passed as a file
    write(b'{"text": "a red fox"}', b'{"prompt": "a cat"}')
    with pytest.raises(ValueError, match=r"line 2, has no caption column 'text'"):
        load_text_image_dataset(str(metadata), IMAGE_SIZE)
