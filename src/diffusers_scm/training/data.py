"""Image data for the training scripts: the built-in scikit-learn digits, local image folders, `datasets` names."""

import os

import numpy as np
import torch
from torch.utils.data import Dataset


__all__ = ["DigitsDataset", "ImageDataset", "load_image_dataset", "to_model_channels"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


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
    """Images from a local folder (optionally one sub-folder per class) or a `datasets` data set."""

    def __init__(self, items, resolution: int, channels: int, image_column="image", label_column=None):
        self.items, self.resolution, self.channels = items, resolution, channels
        self.image_column, self.label_column = image_column, label_column

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        if isinstance(item, tuple):  # (path, label) from a folder
            from PIL import Image

            path, label = item
            with Image.open(path) as image:
                out = {"pixel_values": _pil_to_tensor(image, self.resolution, self.channels)}
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


def load_image_dataset(
    name: str = "digits",
    resolution: int = 16,
    channels: int = 1,
    image_column: str = "image",
    label_column: str | None = None,
    split: str = "train",
    cache_dir: str | None = None,
) -> Dataset:
    """
    The training images as a Dataset of dicts with `pixel_values` in [-1, 1] (and `class_labels`).

    Args:
        name (`str`): "digits" (built in), a local folder of images (class sub-folders give labels), or a
            `datasets` name.
    """
    if name == "digits":
        return DigitsDataset(resolution, split)
    if os.path.isdir(name):
        items = _folder_items(name)
        if not items:
            raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found in {name}.")
        return ImageDataset(items, resolution, channels)
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
