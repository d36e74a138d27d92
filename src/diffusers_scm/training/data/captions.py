"""Captioned data: the captioned digits, image folders with `metadata.jsonl`, prompt files and `datasets` names, checked
row by row when loaded."""

import logging
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import _NAMED, _SKIP_HINT, DigitsDataset, _readable_items


__all__ = [
    "CaptionedDigitsDataset",
    "DIGIT_CAPTIONS",
    "save_captioned_digits",
    "CaptionedImageDataset",
    "load_text_image_dataset",
]


logger = logging.getLogger(__name__)


DIGIT_CAPTIONS = tuple(
    f"digit {name}" for name in "zero one two three four five six seven eight nine".split()
)  # the caption of each class label


class CaptionedDigitsDataset(DigitsDataset):
    """The digits (`DigitsDataset`) as a captioned text-to-image data set: items `{"pixel_values", "caption"}` with
    RGB images (the grey repeated, as captioned image folders give) and the captions `DIGIT_CAPTIONS[label]`
    ("digit zero" .. "digit nine")."""

    @property
    def captions(self) -> list[str]:
        return [DIGIT_CAPTIONS[int(label)] for label in self.labels]

    def __getitem__(self, i):
        return {"pixel_values": self.images[i].repeat(3, 1, 1), "caption": DIGIT_CAPTIONS[int(self.labels[i])]}


def save_captioned_digits(folder: str, resolution: int = 32, split: str = "train") -> str:
    """Write the captioned digits as an image folder in the `datasets` imagefolder convention (PNG files and
    `metadata.jsonl` lines `{"file_name", "text"}`), the captioned data that `examples/distill.py --dataset_name
    FOLDER` takes for a text-to-image teacher. Returns `folder`."""
    import json

    from PIL import Image

    dataset = CaptionedDigitsDataset(resolution, split)
    os.makedirs(folder, exist_ok=True)
    pixels = ((dataset.images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    lines = []
    for i, (image, caption) in enumerate(zip(pixels, dataset.captions)):
        name = f"{i:05d}.png"
        Image.fromarray(image).convert("RGB").save(os.path.join(folder, name))
        lines.append(json.dumps({"file_name": name, "text": caption}))
    tmp = os.path.join(folder, "metadata.jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(folder, "metadata.jsonl"))  # written last: a folder with it is complete
    return folder


class CaptionedImageDataset(Dataset):
    """Images (or, for a prompt-only data set, none) with their captions: items `{"pixel_values", "caption"}` or
    `{"caption"}`. Images are resized (shorter side) and center-cropped to `resolution`, scaled to [-1, 1], RGB."""

    def __init__(self, items, resolution: int, image_column: str | None, caption_column: str):
        self.items, self.resolution = items, resolution
        self.image_column, self.caption_column = image_column, caption_column

    @property
    def has_images(self) -> bool:
        return self.image_column is not None

    @property
    def captions(self) -> list[str]:
        """Every item's caption (the first of several), without reading the images."""
        column = self.items[self.caption_column] if hasattr(self.items, "column_names") else None
        rows = column if column is not None else (item[self.caption_column] for item in self.items)
        return [_caption_text(c) for c in rows]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        out = {"caption": _caption_text(item[self.caption_column])}
        if self.has_images:
            out["pixel_values"] = _center_crop(item[self.image_column], self.resolution)
        return out


def _caption_text(caption) -> str:
    """The caption of a row: the first of several, and the empty caption for a null one."""
    if isinstance(caption, (list, tuple)):  # several captions per image: the first
        caption = caption[0] if len(caption) else None
    return "" if caption is None else str(caption)


def _center_crop(image, resolution: int) -> torch.Tensor:
    """A PIL image (or a path) as an RGB (3, resolution, resolution) tensor in [-1, 1]: resized on its shorter side,
    center-cropped."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as f:
                image = f.convert("RGB")
        except OSError as e:
            raise ValueError(f"Cannot read the image {image}: {e}. {_SKIP_HINT}") from e
    image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _text_lines(path: str):
    """`(line number, line)` of each non-blank line of a UTF-8 text file; other bytes are an error naming the line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a byte-order mark may open the file
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}, line {number}, is not UTF-8 text (byte {raw[e.start]:#04x} at byte {e.start + 1} of the "
                    "line): save the file as UTF-8."
                ) from None
            if line.strip():
                yield number, line


def _lines(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers[:_NAMED])) + (", ..." if len(numbers) > _NAMED else "")


def _metadata_rows(path: str, caption_column: str) -> list[dict]:
    """
    The rows of a `metadata.jsonl`, every one checked when the data is loaded (before training): a JSON object with
    the caption column, a string or a list of strings, and, where the first row has one, a `file_name`. A bad row is
    an error naming the file and line. A null caption (`"text": null`) becomes the empty caption, with one warning
    that counts such rows.
    """
    import json

    rows, null_lines, images = [], [], None
    for number, line in _text_lines(path):
        where = f"{path}, line {number},"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where} is not JSON ({e}): each line is one JSON object.") from e
        if not isinstance(row, dict):
            raise ValueError(f'{where} is not a JSON object: each line is one, {{"file_name": ..., "text": ...}}.')
        if images is None:  # the first row says whether the data set has images
            images = "file_name" in row
        if caption_column not in row:
            raise ValueError(
                f"{where} has no caption column {caption_column!r} (its keys: {sorted(row)}): give every line one, or "
                "pass --caption_column with the key that holds the captions."
            )
        caption = row[caption_column]
        if caption is None:
            row[caption_column] = ""
            null_lines.append(number)
        elif not (isinstance(caption, str) or (caption and isinstance(caption, list) and isinstance(caption[0], str))):
            raise ValueError(
                f"{where} has the caption {caption!r}: a caption is a string (or a list of strings, the first used)."
            )
        if images and not isinstance(row.get("file_name"), str):
            raise ValueError(
                f"{where} has no file_name (a string), although the first line names an image: give every line its "
                "image, or none for prompts alone."
            )
        rows.append(row)
    if null_lines:
        logger.warning(
            f'{path}: {len(null_lines)} of the {len(rows)} rows have "{caption_column}": null (lines '
            f"{_lines(null_lines)}); they are trained with the empty caption."
        )
    return rows


def load_text_image_dataset(
    name: str,
    resolution: int,
    image_column: str | None = "image",
    caption_column: str = "text",
    skip_bad_images: bool = False,
) -> CaptionedImageDataset:
    """
    Captioned images for text-to-image distillation (`datasets`' imagefolder convention), or captions alone:

    - "digits": the built-in digits with captions "digit zero" .. "digit nine" (`CaptionedDigitsDataset`);
    - a local folder with images and `metadata.jsonl` lines `{"file_name": ..., "text": ...}`;
    - a local `.txt` file (one prompt per line) or a `metadata.jsonl` without `file_name`: a prompt-only data set;
    - a `datasets` name (its "train" split), with `image_column` and `caption_column`; without `image_column` in
      it, prompt-only.

    Every line of a `metadata.jsonl` is checked here, before training: text that is not UTF-8, a line that is not a
    JSON object, a row without the caption column (or, where the first row names an image, without `file_name`) and
    a caption that is not text are errors naming the file and line. A null caption (`"text": null`, or `None` in a
    `datasets` column) is trained as the empty caption (as classifier-free guidance's unconditional prompt is), with
    one warning that counts such rows.

    Args:
        name (`str`): the folder, file or `datasets` name.
        resolution (`int`): image size in pixels (resized on the shorter side, center-cropped).
        image_column (`str`, *optional*), caption_column (`str`): column names.
        skip_bad_images (`bool`, defaults to `False`): leave out images that cannot be read (else the first is an
            error naming it), counted in `num_skipped`.
    """
    if name == "digits":  # built in: the captions "digit zero" .. "digit nine"
        return CaptionedDigitsDataset(resolution)
    if os.path.isfile(name):
        if name.endswith(".txt"):
            rows = [{caption_column: line.strip()} for _, line in _text_lines(name)]
        else:
            rows = _metadata_rows(name, caption_column) if name.endswith("metadata.jsonl") else None
            if rows is None:
                raise ValueError(f"{name}: a prompt file must be .txt (one prompt per line) or a metadata.jsonl.")
        return _captioned(rows, resolution, None, caption_column, name)
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "metadata.jsonl")):
            raise ValueError(
                f"{name} has no metadata.jsonl: a captioned image folder needs one line per image, "
                '{"file_name": "0001.png", "text": "a red fox"} (the datasets imagefolder convention).'
            )
        rows = _metadata_rows(os.path.join(name, "metadata.jsonl"), caption_column)
        if rows and "file_name" not in rows[0]:  # prompts only
            return _captioned(rows, resolution, None, caption_column, name)
        for row in rows:
            row[image_column] = os.path.join(name, row.pop("file_name"))
        dataset = _captioned(rows, resolution, image_column, caption_column, name)
        paths = [row[image_column] for row in rows]
        kept, bad = _readable_items(list(zip(paths, range(len(rows)))), name, skip_bad_images)
        dataset.items = [rows[i] for _, i in kept]
        dataset.num_skipped = len(bad)
        return dataset
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"Loading {name!r} needs the `datasets` package: pip install datasets") from e
    data = datasets.load_dataset(name, split="train")
    images = image_column if image_column in data.column_names else None
    return _captioned(data, resolution, images, caption_column, name)


def _captioned(rows, resolution, image_column, caption_column, name) -> CaptionedImageDataset:
    columns = rows.column_names if hasattr(rows, "column_names") else (list(rows[0]) if len(rows) else [])
    if caption_column not in columns:
        raise ValueError(
            f"{name} has no caption column {caption_column!r} (its columns: {columns}); pass --caption_column."
        )
    if len(rows) == 0:
        raise ValueError(f"{name} holds no captions.")
    if hasattr(rows, "column_names"):  # a `datasets` data set (metadata.jsonl rows are checked as they are read)
        nulls = sum(
            c is None or (isinstance(c, (list, tuple)) and (not c or c[0] is None)) for c in rows[caption_column]
        )
        if nulls:
            logger.warning(
                f"{name}: {nulls} of the {len(rows)} rows have no caption in {caption_column!r} (null); they are "
                "trained with the empty caption."
            )
    dataset = CaptionedImageDataset(rows, resolution, image_column, caption_column)
    dataset.num_skipped = 0
    if image_column is None:
        logger.info("%s holds captions without images: x0 will come from the teacher's own ODE samples.", name)
    return dataset
