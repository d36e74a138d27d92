"""Sample-quality metrics: Frechet distances on features, a digits classifier for "FD-digits", paired distances."""

import os

import numpy as np
import torch
from torch import nn


__all__ = [
    "frechet_distance",
    "feature_statistics",
    "paired_rmse",
    "DigitsClassifier",
    "train_digits_classifier",
    "load_digits_classifier",
    "fd_digits",
]


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of features of shape (n, d)."""
    x = np.asarray(features.detach().cpu() if torch.is_tensor(features) else features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"Need features of shape (n >= 2, d), got {x.shape}.")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), in float64 with symmetric eigendecompositions
    (stable for singular covariances, unlike a general matrix square root)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"Shape mismatch: means {mu1.shape} / {mu2.shape}, covariances {s1.shape} / {s2.shape}.")
    root1 = _sqrtm_psd(s1)
    cross = np.linalg.eigvalsh(root1 @ s2 @ root1)
    trace_cross = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_cross)


def paired_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root mean square of per-sample L2 distances between paired samples (e.g. student vs teacher ODE, same noise),
    normalized per element: sqrt(mean ||a_i - b_i||^2 / D)."""
    if a.shape != b.shape:
        raise ValueError(f"Paired samples must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    diff = (a.double() - b.double()).flatten(1)
    return diff.pow(2).mean(1).mean().sqrt().item()


class DigitsClassifier(nn.Module):
    """A small MLP on 8x8 digits; its penultimate layer (64 features) gives the FD-digits feature space."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.SiLU(), nn.Linear(256, 64), nn.SiLU())
        self.head = nn.Linear(64, 10)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] of any size and 1 or 3 channels -> (n, 1, 8, 8)."""
        images = images.float()
        if images.shape[1] == 3:
            images = images.mean(1, keepdim=True)
        if images.shape[-1] != 8:
            images = nn.functional.interpolate(images, size=(8, 8), mode="area")
        return images

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(self.prepare(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))


def train_digits_classifier(epochs: int = 60, seed: int = 0) -> tuple["DigitsClassifier", float]:
    """Train deterministically (CPU, seconds) on the digits training split; returns the model and held-out accuracy."""
    from .training.data import DigitsDataset

    train, test = DigitsDataset(8, "train"), DigitsDataset(8, "test")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    x, y = train.images, train.labels
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test.images).argmax(1) == test.labels).float().mean().item()
    return model, accuracy


def load_digits_classifier(cache_dir: str | None = None) -> tuple["DigitsClassifier", float]:
    """The cached digits classifier (trained on first use, then stored as safetensors) and its held-out accuracy."""
    from safetensors.torch import load_file, save_file

    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "diffusers_scm")
    path = os.path.join(cache_dir, "digits_classifier.safetensors")
    if os.path.isfile(path):
        state = load_file(path)
        accuracy = float(state.pop("_accuracy").item())
        model = DigitsClassifier()
        model.load_state_dict(state)
        return model.eval(), accuracy
    model, accuracy = train_digits_classifier()
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + ".tmp"
    save_file({**{k: v.contiguous() for k, v in model.state_dict().items()}, "_accuracy": torch.tensor(accuracy)}, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return model, accuracy


@torch.no_grad()
def fd_digits(images: torch.Tensor, reference: torch.Tensor, classifier: "DigitsClassifier | None" = None) -> float:
    """Frechet distance between two sets of digit images (in [-1, 1]) in the digits classifier's feature space."""
    classifier = classifier or load_digits_classifier()[0]
    return frechet_distance(
        *feature_statistics(classifier.embed(images)), *feature_statistics(classifier.embed(reference))
    )
