"""Small helpers shared by the scripts and the package."""

import contextlib
import json
import math
import os
import shutil


__all__ = ["read_json", "square_image_grid", "atomic_folder"]

_RESAVE = (
    "Save the pipeline again (`save_pretrained`, or the script that wrote it), or download it again (for a Hub id: "
    "`force_download=True`, or delete its folder in the Hugging Face cache)."
)


def read_json(path: str, fix: str = _RESAVE):
    """
    Read a JSON file (a `model_index.json`, a component's config, ...); a damaged file is a `ValueError` that names
    it and says what to do.

    Args:
        path (`str`): the file.
        fix (`str`, *optional*): what to do about a damaged file (default: save or download the pipeline again).
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): the file is damaged or was cut "
            f"off while being written. {fix}"
        ) from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a UTF-8 text file, so not valid JSON: the file is damaged. {fix}") from e


def square_image_grid(images: list):
    """PIL images in a near-square grid (ceil(sqrt(n)) columns), the empty cells filled with black."""
    from diffusers.utils import make_image_grid

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    filler = [images[0].point(lambda _: 0)] * (rows * cols - len(images))
    return make_image_grid(list(images) + filler, rows=rows, cols=cols)


def video_filmstrips(frames):
    """Videos (N, F, H, W, C), as `SCMPipeline(..., output_type="np").frames` returns them, as images (N, H, F * W, C):
    each video's frames side by side, for grids and trackers."""
    n, f, h, w, c = frames.shape
    return frames.transpose(0, 2, 1, 3, 4).reshape(n, h, f * w, c)


@contextlib.contextmanager
def atomic_folder(final: str):
    """
    Write a folder whole or not at all, as checkpoints are written: yields a temporary folder beside `final`
    (`final + ".tmp"`, emptied first) to write into; when the block ends without an error it takes the place of
    `final` (an existing folder there is moved aside, then deleted). On an error the temporary folder is deleted; a
    process killed while writing leaves `final` as it was (the next write empties the stale temporary folder).

    Args:
        final (`str`): the folder to write.
    """
    final = os.path.normpath(final)
    tmp, old = final + ".tmp", final + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(final):
        os.replace(final, old)  # two renames: a folder cannot replace a non-empty one in one step
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
