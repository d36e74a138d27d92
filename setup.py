"""Packaging for diffusers-scm: one- and two-step generators from diffusion models, inside diffusers."""

import re
from pathlib import Path

from setuptools import find_packages, setup


HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "src/diffusers_scm/__init__.py").read_text()).group(1)

install_requires = [
    "torch>=2.1",
    "diffusers>=0.32",
    "huggingface_hub>=0.25",
    "jinja2",  # model cards
    "safetensors>=0.4",
    "numpy",
    "Pillow",
]

docs = [
    "mkdocs>=1.6",  # validation of links and anchors
    "mkdocs-material>=9.5",
    "mkdocstrings[python]>=0.28",
    "mkdocstrings-python>=1.19",  # `filters: public` (a module's __all__)
]

extras = {
    "test": [
        "pytest>=7",
        "scipy",
        "scikit-learn",
        "accelerate>=0.30",
        "matplotlib",
        "transformers>=4.41",  # text encoders of the text-to-image tests
        "datasets>=2.19",  # latent / prompt-embedding caches
        "peft>=0.14",  # LoRA students
        "tensorboard",  # the scripts' default tracker, so that their tests start it
        *docs,  # tests/test_docs.py builds the documentation site
    ],
    "training": [
        "accelerate>=0.30",
        "datasets>=2.19",
        "transformers>=4.41",
        "peft>=0.14",
        "tensorboard",
        "scikit-learn",
        "tqdm",
        "matplotlib",
    ],
    "flash": ["flash-attn", "xformers", "jvp-flash-attention"],
    "metrics": ["scipy", "torch-fidelity", "matplotlib"],
    "video": ["av"],  # MP4 / MOV / WebM clips for text-to-video distillation (GIF, WebP, APNG read through PIL)
    "docs": docs,
}
extras["dev"] = sorted(set(extras["test"] + extras["training"] + ["ruff>=0.4"]))

setup(
    name="diffusers-scm",
    version=VERSION,
    description="Continuous-time consistency models (sCM) and truncated consistency models (TCM) for diffusers",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"diffusers_scm": ["model_cards/*.md"]},
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
