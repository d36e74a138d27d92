"""Small helpers shared by the scripts and the package."""

import json
import math


__all__ = ["read_json", "square_image_grid"]

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
