"""Image data for the training scripts: the built-in scikit-learn digits, local image folders, `datasets` names."""

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import Dataset


logger = logging.getLogger(__name__)

__all__ = ["DigitsDataset", "ImageDataset", "load_image_dataset", "to_model_channels"]


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
