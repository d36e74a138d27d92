"""Image data for the training scripts: the built-in scikit-learn digits, local image folders, `datasets` names."""

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import Dataset


__all__ = [
    "DigitsDataset",
    "CaptionedDigitsDataset",
    "DIGIT_CAPTIONS",
    "save_captioned_digits",
    "ImageDataset",
    "CaptionedImageDataset",
    "load_image_dataset",
    "load_text_image_dataset",
    "to_model_channels",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_SKIP_HINT = "Replace or delete such files, or pass --skip_bad_images (`skip_bad_images=True`) to train without them."
_NAMED = 5  # unreadable files named in errors and warnings


def _resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    return torch.nn.functional.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), scaled to [-1, 1] and upsampled.

    Args:
        resolution (`int`, defaults to 16): output size.
        split (`str`, defaults to "train"): "train" (1,500 images), "test" (the other 297) or "all"; the split is a
            fixed random permutation (seed 0), so both halves mix all writers (the file's last images come from
            writers absent from its first ones).
    """

    num_skipped = 0  # no unreadable files to skip

    def __init__(self, resolution: int = 16, split: str = "train"):
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise ImportError("The digits data set needs scikit-learn: `pip install scikit-learn`.") from e
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0 * 2 - 1  # (N, 1, 8, 8) in [-1, 1]
        labels = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        pick = {"train": order[:1500], "test": order[1500:], "all": torch.arange(len(images))}
        if split not in pick:
            raise ValueError(f"Unknown split {split!r}: use 'train', 'test' or 'all'.")
        self.images = _resize(images[pick[split]], resolution).clamp(-1, 1)
        self.labels = labels[pick[split]]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "class_labels": self.labels[i]}


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


def _pil_to_tensor(image, resolution: int, channels: int) -> torch.Tensor:
    from PIL import Image

    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    side = min(w, h)  # center crop, then resize
    image = image.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2))
    image = image.resize((resolution, resolution), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy())


class ImageDataset(Dataset):
    """Images from a local folder (optionally one sub-folder per class) or a `datasets` data set.

    Args:
        items: `(path, label)` pairs of a folder's images, or a `datasets` data set.
        resolution (`int`), channels (`int`): the output size and channels.
        image_column (`str`), label_column (`str`, *optional*): the columns of a `datasets` data set.
        skipped (`list[str]`, *optional*): the unreadable files left out of `items` (`skip_bad_images=True`); their
            number is `num_skipped`.
    """

    def __init__(self, items, resolution: int, channels: int, image_column="image", label_column=None, skipped=()):
        self.items, self.resolution, self.channels = items, resolution, channels
        self.image_column, self.label_column = image_column, label_column
        self.skipped = list(skipped)
        self.num_skipped = len(self.skipped)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        if isinstance(item, tuple):  # (path, label) from a folder
            from PIL import Image

            path, label = item
            try:
                with Image.open(path) as image:
                    out = {"pixel_values": _pil_to_tensor(image, self.resolution, self.channels)}
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for damaged files
                raise ValueError(f"Cannot read the image {path} ({type(e).__name__}: {e}). {_SKIP_HINT}") from e
            if label is not None:
                out["class_labels"] = torch.tensor(label)
            return out
        if self.image_column not in item:
            raise KeyError(
                f"Column {self.image_column!r} not in the data set; it has {list(item)}. Use --image_column."
            )
        out = {"pixel_values": _pil_to_tensor(item[self.image_column], self.resolution, self.channels)}
        if self.label_column is not None:
            out["class_labels"] = torch.tensor(int(item[self.label_column]))
        return out


def _folder_items(root: str):
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if classes:
        return [
            (os.path.join(root, c, f), k)
            for k, c in enumerate(classes)
            for f in sorted(os.listdir(os.path.join(root, c)))
            if f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return [(os.path.join(root, f), None) for f in sorted(os.listdir(root)) if f.lower().endswith(IMAGE_EXTENSIONS)]


def _read_error(path: str) -> str | None:
    """`None` where PIL decodes the whole image, else the error (`"OSError: image file is truncated"`, say)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for damaged files
        return f"{type(e).__name__}: {e}"
    return None


def _readable_items(items: list, root: str, skip_bad_images: bool) -> tuple[list, list[str]]:
    """Decode every image of a folder once, before training starts: `(readable items, unreadable paths)`. An
    unreadable file is an error naming it, or, with `skip_bad_images`, left out with a warning."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        errors = list(pool.map(_read_error, [path for path, _ in items]))
    bad = [(path, error) for (path, _), error in zip(items, errors) if error is not None]
    if not bad:
        return items, []
    names = ", ".join(path for path, _ in bad[:_NAMED]) + (", ..." if len(bad) > _NAMED else "")
    if not skip_bad_images:
        path, error = bad[0]
        others = f" ({len(bad)} of the {len(items)} images in {root} cannot be read: {names})" if len(bad) > 1 else ""
        raise ValueError(f"Cannot read the image {path} ({error}){others}. {_SKIP_HINT}")
    logger.warning(f"Skipping {len(bad)} of the {len(items)} images in {root} that cannot be read: {names}.")
    return [item for item, error in zip(items, errors) if error is None], [path for path, _ in bad]


def load_image_dataset(
    name: str = "digits",
    resolution: int = 16,
    channels: int = 1,
    image_column: str = "image",
    label_column: str | None = None,
    split: str = "train",
    cache_dir: str | None = None,
    skip_bad_images: bool = False,
) -> Dataset:
    """
    The training images as a Dataset of dicts with `pixel_values` in [-1, 1] (and `class_labels`).

    Args:
        name (`str`): "digits" (built in), a local folder of images (class sub-folders give labels), or a
            `datasets` name.
        skip_bad_images (`bool`, defaults to `False`): a folder's images are all decoded once when it is loaded, so
            that a damaged file (truncated, say) is found before training starts. By default such a file is an error
            that names it; with `True` it is left out, and a warning gives their number and the first names. The data
            set's `num_skipped` counts them.
    """
    if name == "digits":
        return DigitsDataset(resolution, split)
    if os.path.isdir(name):
        items = _folder_items(name)
        if not items:
            raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found in {name}.")
        items, skipped = _readable_items(items, name, skip_bad_images)
        if not items:
            raise ValueError(f"None of the {len(skipped)} images in {name} can be read (e.g. {skipped[0]}).")
        return ImageDataset(items, resolution, channels, skipped=skipped)
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"Loading {name!r} needs the `datasets` package: `pip install diffusers-scm[training]`."
        ) from e
    data = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    return ImageDataset(data, resolution, channels, image_column, label_column)


def to_model_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Match the network's input channels: grey images are repeated to 3 channels; other mismatches are errors."""
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 1:
        return images.repeat(1, channels, 1, 1)
    raise ValueError(
        f"The data has {images.shape[1]} channels but the network takes {channels}: choose a matching data set or "
        "network."
    )


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
