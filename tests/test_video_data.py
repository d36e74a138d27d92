"""Captioned clips for text-to-video distillation (`diffusers_scm.training.data.videos`): GIF, WebP and APNG through PIL,
MP4 through PyAV, frames sampled evenly from the start at the resolution of the image path, (C, F, H, W) in [-1, 1];
short, unreadable and unknown files, and frame counts the VAE does not encode whole, are errors that name the file and
the fix (or skipped and counted)."""

import json
import logging
import sys

import numpy as np
import pytest
import torch
from video_pipelines import clip_frames, save_clips, save_gif

from diffusers_scm.training.data.videos import (
    count_video_frames,
    frame_indices,
    load_text_video_dataset,
    read_video_frames,
)


def _expected_frame(frame: np.ndarray, resolution: int) -> np.ndarray:
    """The image path's resize (shorter side) and center crop of one frame, in [-1, 1]."""
    from PIL import Image

    from diffusers_scm.training.data.captions import _center_crop

    return _center_crop(Image.fromarray(frame), resolution).permute(1, 2, 0).numpy()


def _write_metadata(folder, rows):
    with open(folder / "metadata.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")


def test_frame_indices_are_even_from_the_start():
    assert frame_indices(16, 5) == [0, 3, 6, 9, 12]
    assert frame_indices(7, 5) == [0, 1, 2, 3, 4]
    assert frame_indices(5, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="fewer than the 5"):
        frame_indices(4, 5)


def test_gif_clips_are_sampled_resized_and_cropped_as_images(tmp_path):
    frames = clip_frames(16, size=24, seed=1)
    folder = tmp_path / "clips"
    folder.mkdir()
    save_gif(folder / "a.gif", frames)
    _write_metadata(folder, [{"file_name": "a.gif", "text": "a red fox"}])
    data = load_text_video_dataset(str(folder), 16, 5)
    item = data[0]
    assert item["caption"] == "a red fox" and data.has_images and data.num_skipped == 0
    video = item["pixel_values"]
    assert video.shape == (3, 5, 16, 16) and video.min() >= -1 and video.max() <= 1
    decoded = [np.asarray(f) for f in read_video_frames(str(folder / "a.gif"))]  # GIF is paletted: compare decoded
    assert len(decoded) == 16
    for k, index in enumerate([0, 3, 6, 9, 12]):
        np.testing.assert_allclose(video[:, k].permute(1, 2, 0).numpy(), _expected_frame(decoded[index], 16))
    assert not torch.allclose(video[:, 0], video[:, 1])  # the square moves


@pytest.mark.parametrize("ext", [".webp", ".png"])
def test_animated_webp_and_apng_read_every_frame(tmp_path, ext):
    from PIL import Image, features

    if ext == ".webp" and not features.check("webp"):
        pytest.skip("this Pillow has no WebP support")
    frames = clip_frames(6, size=20)
    path = tmp_path / f"clip{ext}"
    images = [Image.fromarray(f) for f in frames]
    kwargs = {"lossless": True} if ext == ".webp" else {}
    images[0].save(path, save_all=True, append_images=images[1:], duration=40, **kwargs)
    assert count_video_frames(str(path)) == 6
    read = read_video_frames(str(path), 5)
    assert len(read) == 5
    np.testing.assert_array_equal(np.asarray(read[4]), frames[4])


def _write_mp4(path, frames):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_mp4_through_pyav(tmp_path):
    pytest.importorskip("av")
    folder = tmp_path / "mp4"
    folder.mkdir()
    frames = clip_frames(9, size=32)
    _write_mp4(folder / "a.mp4", frames)
    _write_metadata(folder, [{"file_name": "a.mp4", "text": "a blue bird"}])
    data = load_text_video_dataset(str(folder), 16, 5)
    video = data[0]["pixel_values"]
    assert video.shape == (3, 5, 16, 16)
    reference = torch.from_numpy(_expected_frame(frames[0], 16)).permute(2, 0, 1)
    assert (video[:, 0] - reference).abs().mean() < 0.1  # lossy codec: close to the frame written


def test_mp4_without_pyav_names_the_extra(tmp_path, monkeypatch):
    folder = tmp_path / "mp4"
    folder.mkdir()
    (folder / "a.mp4").write_bytes(b"\x00" * 64)
    _write_metadata(folder, [{"file_name": "a.mp4", "text": "a fox"}])
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    with pytest.raises(ImportError, match=r"a\.mp4.*pip install diffusers-scm\[video\]"):
        load_text_video_dataset(str(folder), 16, 5)


def test_short_unreadable_and_unknown_clips_are_named_or_skipped(tmp_path, caplog):
    folder = tmp_path / "clips"
    save_clips(folder, captions=("a red fox", "a blue bird"), num_frames=7)
    save_gif(folder / "short.gif", clip_frames(3))
    (folder / "broken.gif").write_bytes(b"GIF89a not really")
    rows = [
        {"file_name": "000.gif", "text": "a red fox"},
        {"file_name": "short.gif", "text": "a cat"},
        {"file_name": "broken.gif", "text": "a dog"},
        {"file_name": "001.gif", "text": "a blue bird"},
    ]
    _write_metadata(folder, rows)
    with pytest.raises(ValueError, match=r"short\.gif has 3 frames, fewer than --num_frames 5.*smaller --num_frames"):
        load_text_video_dataset(str(folder), 16, 5)
    _write_metadata(folder, [rows[2], rows[0]])
    with pytest.raises(ValueError, match=r"broken\.gif cannot be read.*--skip_bad_images"):
        load_text_video_dataset(str(folder), 16, 5)
    _write_metadata(folder, rows)
    with caplog.at_level(logging.WARNING):
        data = load_text_video_dataset(str(folder), 16, 5, skip_bad_videos=True)
    assert data.num_skipped == 2 and len(data) == 2 and data.captions == ["a red fox", "a blue bird"]
    assert "Skipping 2 of the 4 clips" in caplog.text
    _write_metadata(folder, [{"file_name": "a.bmp", "text": "x"}])
    with pytest.raises(ValueError, match=r"a\.bmp: \.bmp is not a video format.*\.gif"):
        load_text_video_dataset(str(folder), 16, 5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no metadata.jsonl"):
        load_text_video_dataset(str(tmp_path / "empty"), 16, 5)


def test_prompt_only_video_data(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n\na blue bird\n")
    data = load_text_video_dataset(str(prompts), 16, 5)
    assert (
        not data.has_images and data.captions == ["a red fox", "a blue bird"] and data[1] == {"caption": "a blue bird"}
    )
    folder = tmp_path / "captions"
    folder.mkdir()
    _write_metadata(folder, [{"text": "a cat"}])
    assert not load_text_video_dataset(str(folder), 16, 5).has_images


def test_frame_counts_the_vae_cannot_encode_whole():
    from video_pipelines import tiny_wan

    codec = (
        __import__("diffusers_scm.families", fromlist=["get_family"])
        .get_family("WanPipeline")
        .latent_codec(tiny_wan().vae)
    )
    assert codec.temporal_factor == 4 and codec.scale_factor == 8 and codec.latent_channels == 16
    assert codec.latent_shape(2, 16, 32, 9) == (2, 16, 3, 2, 4)
    with pytest.raises(ValueError, match="6 frames: AutoencoderKLWan encodes 4k \\+ 1 frames.*Use 5 or 9 frames"):
        codec.check_num_frames(6)
    with pytest.raises(ValueError, match="encodes videos \\(B, 3, F, H, W\\)"):
        codec.encode(torch.zeros(1, 3, 16, 16))
