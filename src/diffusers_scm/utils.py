"""Small helpers shared by the scripts and the package."""

import math


__all__ = ["square_image_grid"]


def square_image_grid(images: list):
    """PIL images in a near-square grid (ceil(sqrt(n)) columns), the empty cells filled with black."""
    from diffusers.utils import make_image_grid

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    filler = [images[0].point(lambda _: 0)] * (rows * cols - len(images))
    return make_image_grid(list(images) + filler, rows=rows, cols=cols)
