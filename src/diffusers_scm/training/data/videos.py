"""Captioned videos for text-to-video distillation (SPEC.md section 8): a folder of clips with `metadata.jsonl`
captions, or captions alone.

    folder/
        metadata.jsonl      {"file_name": "clip-0001.mp4", "text": "a red fox running"}   one line per clip
        clip-0001.mp4
        clip-0002.gif

Clips are read whole: animated GIF, WebP and PNG (APNG) through PIL (every frame), MP4 / MOV / WebM / MKV / AVI through
PyAV (`pip install diffusers-scm[video]`; without it such a file is an error that says so). Each item is
`num_frames` frames sampled evenly from the start, a constant stride of max(1, total // num_frames) frames from frame
0 (a 16-frame clip sampled to 5 frames keeps frames 0, 3, 6, 9, 12: the clip's motion at a constant frame rate), each
frame center-cropped to a square and resized to `resolution` as the image path does, as a tensor (C, F, H, W)
in [-1, 1], the layout video VAEs encode.

Every clip is opened once when the data is loaded (its frames counted, not decoded): a file that cannot be read, or a
clip with fewer frames than `num_frames`, is an error that names it and the fix, or, with `skip_bad_videos`
(`--skip_bad_images`), left out with one warning that counts them (`num_skipped`). Whether the VAE encodes
`num_frames` whole (4k + 1 frames for Wan's) is checked against the teacher's codec by `examples/distill.py`
(`VideoLatentCodec.check_num_frames`) before any clip is read.

A `metadata.jsonl` without `file_name`, or a `.txt` file of prompts, is a prompt-only data set: x0 comes from the
teacher's own guided ODE (`TextBatches`), at `num_frames` frames.
"""

import logging
import os

import torch

from .captions import CaptionedImageDataset, _caption_text, _metadata_rows, _text_lines
from .images import _NAMED, _pil_to_tensor


__all__ = [
    "CaptionedVideoDataset",
    "PIL_VIDEO_EXTENSIONS",
    "AV_VIDEO_EXTENSIONS",
    "load_text_video_dataset",
    "read_video_frames",
    "count_video_frames",
    "frame_indices",
]

logger = logging.getLogger(__name__)

PIL_VIDEO_EXTENSIONS = (".gif", ".webp", ".png", ".apng")
AV_VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v")
_SKIP_HINT = "Replace or delete such files, or pass --skip_bad_images (`skip_bad_videos=True`) to train without them."
_AV_HINT = "Reading MP4 and other container videos needs PyAV: pip install diffusers-scm[video] (or pip install av)."


def _import_av(path: str):
    try:
        import av
    except ImportError as e:
        raise ImportError(f"Cannot read the video {path}: {_AV_HINT}") from e
    return av


def _uses_av(path: str) -> bool:
    ext = os.path.splitext(path)[1].lower()
    if ext in AV_VIDEO_EXTENSIONS:
        return True
    if ext in PIL_VIDEO_EXTENSIONS:
        return False
    raise ValueError(
        f"{path}: {ext or 'no extension'} is not a video format this reads: use animated "
        f"{', '.join(PIL_VIDEO_EXTENSIONS)} (PIL) or {', '.join(AV_VIDEO_EXTENSIONS)} (PyAV)."
    )


def count_video_frames(path: str) -> int:
    """The number of frames of a clip, without decoding them where the format records it."""
    if _uses_av(path):
        av = _import_av(path)
        with av.open(path) as container:
            stream = container.streams.video[0]
            if stream.frames:
                return int(stream.frames)
            return sum(1 for _ in container.decode(stream))
    from PIL import Image

    with Image.open(path) as image:
        return int(getattr(image, "n_frames", 1))


def frame_indices(total: int, num_frames: int) -> list[int]:
    """`num_frames` indices of a `total`-frame clip, evenly from the start: 0, k, 2k, ... with k = total //
    num_frames (at least 1)."""
    if total < num_frames:
        raise ValueError(f"A clip of {total} frames has fewer than the {num_frames} asked for.")
    stride = max(1, total // num_frames)
    return [i * stride for i in range(num_frames)]


def read_video_frames(path: str, num_frames: int | None = None) -> list:
    """The frames of a clip as RGB PIL images: all of them, or `num_frames` chosen by `frame_indices`."""
    from PIL import Image

    if _uses_av(path):
        av = _import_av(path)
        with av.open(path) as container:
            frames = [frame.to_image().convert("RGB") for frame in container.decode(container.streams.video[0])]
    else:
        frames = []
        with Image.open(path) as image:
            for i in range(getattr(image, "n_frames", 1)):
                image.seek(i)
                frames.append(image.convert("RGB"))
    if num_frames is None:
        return frames
    return [frames[i] for i in frame_indices(len(frames), num_frames)]


def video_tensor(path: str, num_frames: int, resolution: int) -> torch.Tensor:
    """A clip as (3, num_frames, resolution, resolution) in [-1, 1] (module docstring)."""
    try:
        frames = read_video_frames(path, num_frames)
    except ImportError:
        raise
    except Exception as e:
        raise ValueError(f"Cannot read the video {path} ({type(e).__name__}: {e}). {_SKIP_HINT}") from e
    return torch.stack([_pil_to_tensor(f, resolution, 3) for f in frames], dim=1)  # as images: (3, F, H, W)


class CaptionedVideoDataset(CaptionedImageDataset):
    """Clips (or, prompt-only, none) with their captions: items `{"pixel_values": (3, F, H, W), "caption"}` or
    `{"caption"}` (module docstring)."""

    def __init__(self, items, resolution: int, num_frames: int, video_column: str | None, caption_column: str):
        super().__init__(items, resolution, video_column, caption_column)
        self.num_frames = num_frames

    def __getitem__(self, i):
        item = self.items[i]
        out = {"caption": _caption_text(item[self.caption_column])}
        if self.has_images:
            out["pixel_values"] = video_tensor(item[self.image_column], self.num_frames, self.resolution)
        return out


def _check_clip(path: str, num_frames: int) -> str | None:
    """What is wrong with a clip (None: it can be read and has at least `num_frames` frames)."""
    try:
        total = count_video_frames(path)
    except ImportError:
        raise
    except Exception as e:
        return f"cannot be read ({type(e).__name__}: {e})"
    if total < num_frames:
        return f"has {total} frames, fewer than --num_frames {num_frames}"
    return None


def _usable_clips(paths: list[str], root: str, num_frames: int, skip: bool) -> list[int]:
    problems = [(i, _check_clip(p, num_frames)) for i, p in enumerate(paths)]
    bad = [(paths[i], why) for i, why in problems if why is not None]
    if bad:
        names = ", ".join(p for p, _ in bad[:_NAMED]) + (", ..." if len(bad) > _NAMED else "")
        if not skip:
            path, why = bad[0]
            fix = (
                f"Use clips of at least {num_frames} frames or a smaller --num_frames; or pass --skip_bad_images to "
                "train without them."
                if "fewer than" in why
                else _SKIP_HINT
            )
            others = f" ({len(bad)} of the {len(paths)} clips in {root} are unusable: {names})" if len(bad) > 1 else ""
            raise ValueError(f"The video {path} {why}{others}. {fix}")
        logger.warning(
            f"Skipping {len(bad)} of the {len(paths)} clips in {root} that cannot be read or have fewer than "
            f"{num_frames} frames: {names}."
        )
    return [i for i, why in problems if why is None]


def load_text_video_dataset(
    name: str,
    resolution: int,
    num_frames: int,
    caption_column: str = "text",
    skip_bad_videos: bool = False,
) -> CaptionedVideoDataset:
    """
    Captioned clips for text-to-video distillation, or captions alone (module docstring):

    - a local folder with clips and `metadata.jsonl` lines `{"file_name": ..., "text": ...}`;
    - a folder whose `metadata.jsonl` has no `file_name`, a `metadata.jsonl` file, or a `.txt` file of prompts (one
      per line): prompt-only.

    `metadata.jsonl` is checked line by line as for images (`load_text_image_dataset`), and every clip is opened once
    here: an unreadable clip, or one with fewer than `num_frames` frames, is an error naming it (or, with
    `skip_bad_videos`, left out and counted in `num_skipped`). An MP4 without PyAV installed is an error that names
    `pip install diffusers-scm[video]`.

    Args:
        name (`str`): the folder or prompt file.
        resolution (`int`): frame size in pixels (center-cropped to a square, resized).
        num_frames (`int`): frames per clip, sampled evenly from the start.
        caption_column (`str`): the caption key of `metadata.jsonl`.
        skip_bad_videos (`bool`, defaults to `False`): leave unusable clips out instead of stopping.
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}.")
    if os.path.isfile(name):
        if name.endswith(".txt"):
            rows = [{caption_column: line.strip()} for _, line in _text_lines(name)]
        elif name.endswith("metadata.jsonl"):
            rows = _metadata_rows(name, caption_column)
        else:
            raise ValueError(f"{name}: a prompt file must be .txt (one prompt per line) or a metadata.jsonl.")
        return _dataset(rows, resolution, num_frames, None, caption_column, name)
    if not os.path.isdir(name):
        raise ValueError(
            f"{name} is neither a folder of clips with metadata.jsonl nor a prompt file (.txt or metadata.jsonl): "
            "text-to-video data is local (see docs/guides/text-to-video.md)."
        )
    metadata = os.path.join(name, "metadata.jsonl")
    if not os.path.isfile(metadata):
        raise ValueError(
            f"{name} has no metadata.jsonl: a captioned video folder needs one line per clip, "
            '{"file_name": "clip-0001.mp4", "text": "a red fox running"}.'
        )
    rows = _metadata_rows(metadata, caption_column)
    if rows and "file_name" not in rows[0]:
        return _dataset(rows, resolution, num_frames, None, caption_column, name)
    column = "video"
    for row in rows:
        row[column] = os.path.join(name, row.pop("file_name"))
    for row in rows:
        _uses_av(row[column])  # an unknown format is named before any clip is opened
    if any(_uses_av(row[column]) for row in rows):
        _import_av(next(row[column] for row in rows if _uses_av(row[column])))
    kept = _usable_clips([row[column] for row in rows], name, num_frames, skip_bad_videos)
    dataset = _dataset([rows[i] for i in kept], resolution, num_frames, column, caption_column, name)
    dataset.num_skipped = len(rows) - len(kept)
    return dataset


def _dataset(rows, resolution, num_frames, column, caption_column, name) -> CaptionedVideoDataset:
    if not rows:
        raise ValueError(f"{name} holds no usable clips or captions.")
    dataset = CaptionedVideoDataset(rows, resolution, num_frames, column, caption_column)
    dataset.num_skipped = 0
    if column is None:
        logger.info("%s holds captions without clips: x0 will come from the teacher's own ODE samples.", name)
    return dataset
