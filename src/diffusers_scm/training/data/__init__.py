"""Data for the training scripts: images and captions as loaded (`images`, `captions`), the text encoders made for
teachers trained here (`text_encoders`), and data encoded once (`latent_cache` on disk, `encoded` in memory)."""

from .captions import (
    DIGIT_CAPTIONS,
    CaptionedDigitsDataset,
    CaptionedImageDataset,
    load_text_image_dataset,
    save_captioned_digits,
)
from .images import IMAGE_EXTENSIONS, DigitsDataset, ImageDataset, load_image_dataset, to_model_channels


__all__ = [
    "DigitsDataset",
    "ImageDataset",
    "load_image_dataset",
    "to_model_channels",
    "IMAGE_EXTENSIONS",
    "CaptionedDigitsDataset",
    "CaptionedImageDataset",
    "DIGIT_CAPTIONS",
    "load_text_image_dataset",
    "save_captioned_digits",
]
