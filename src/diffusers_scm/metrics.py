"""Sample-quality metrics: Frechet distances on features, a digits classifier for "FD-digits", paired distances,
the diversity of a prompt's samples, and the demos' targets."""

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
    "mean_pairwise_distance",
    "group_diversity",
    "digit_of_prompt",
    "few_step_target",
    "describe_target",
    "teacher_samples_target",
    "describe_teacher_samples_target",
    "InceptionFeatures",
    "fid",
    "to_uint8",
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
    from .training.data.images import DigitsDataset

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


def mean_pairwise_distance(features) -> float:
    """The mean Euclidean distance over the n (n - 1) / 2 distinct pairs of rows of `features` (n, d), in float64: the
    spread of a sample set in a feature space (0 for identical samples)."""
    x = np.asarray(features.detach().cpu() if torch.is_tensor(features) else features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"Need features of shape (n >= 2, d), got {x.shape}.")
    n, x = x.shape[0], torch.from_numpy(x)
    distances = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")  # exact, not |a|^2 + |b|^2 - 2ab
    return float(distances.sum() / (n * (n - 1)))


def group_diversity(features, num_groups: int = 1) -> np.ndarray:
    """
    The diversity of each group of samples: the mean pairwise distance (`mean_pairwise_distance`) between the
    features of its samples, where sample i belongs to group i mod `num_groups` (`evaluate.py` draws image i for prompt
    i mod the number of prompts). A generator that draws one image per prompt, whatever the noise, scores 0.

    Args:
        features (`torch.Tensor` or `np.ndarray`): features of shape (n, d), e.g. `DigitsClassifier.embed(images)`.
        num_groups (`int`, defaults to 1): the number of prompts (or classes); 1 for one group of all samples.

    Returns:
        `np.ndarray` of shape (num_groups,), float64: NaN for a group with fewer than 2 samples.
    """
    x = np.asarray(features.detach().cpu() if torch.is_tensor(features) else features, dtype=np.float64)
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}.")
    return np.array(
        [mean_pairwise_distance(x[g::num_groups]) if len(x[g::num_groups]) >= 2 else np.nan for g in range(num_groups)]
    )


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_of_prompt(prompt: str) -> int | None:
    """The digit a prompt names ("digit seven", "a 7"), for prompt accuracy; None when it names none or several."""
    import re

    words = re.findall(r"[a-z]+|\d", prompt.lower())
    found = {DIGIT_WORDS.index(w) if w in DIGIT_WORDS else int(w) for w in words if w in DIGIT_WORDS or w.isdigit()}
    return found.pop() if len(found) == 1 else None


def few_step_target(
    teacher_rows: list[dict], row: dict, limit: float, nfe_reduction: float = 16, metric: str = "fd_digits"
) -> dict:
    """
    Whether a few-step sample row meets "`metric` <= `limit` x the teacher's best, at >= `nfe_reduction` x fewer
    network evaluations" (rows: dicts with `nfe` and `metric`, lower is better). The ratio is to the teacher's best
    row over every NFE evaluated; the NFE claim needs the teacher evaluated at `nfe_reduction` x the row's NFE or
    more, where its best is then compared (its metric there is no lower than its overall best, so the student is within
    `limit` of it too). Returns `ratio`, `limit`, `teacher_nfe` (the teacher row compared at >= `nfe_reduction` x,
    None without one), `ratio_at_nfe` (the student against that row), `nfe_reduction` (its NFE / the row's) and `met`.
    """
    best = min(teacher_rows, key=lambda r: r[metric])
    ratio = row[metric] / best[metric]
    far = [r for r in teacher_rows if r["nfe"] >= nfe_reduction * row["nfe"]]
    compared = min(far, key=lambda r: r[metric]) if far else None
    return {
        "ratio": ratio,
        "limit": limit,
        "teacher_nfe": None if compared is None else compared["nfe"],
        "ratio_at_nfe": None if compared is None else row[metric] / compared[metric],
        "nfe_reduction": 0.0 if compared is None else compared["nfe"] / row["nfe"],
        "met": bool(ratio <= limit and compared is not None),
    }


def describe_target(name: str, target: dict, metric: str = "FD-digits") -> str:
    """One report line for a `few_step_target` result (with the ratio under `fd_ratio_to_teacher_best` or `ratio`)."""
    ratio = target.get("fd_ratio_to_teacher_best", target.get("ratio"))
    line = f"- {name}: {metric} {ratio:.2f}x the teacher's best (target <= {target['limit']}x)"
    if target["teacher_nfe"] is None:
        return line + ", the teacher not evaluated at 16x the NFE"
    return line + (
        f", {target['ratio_at_nfe']:.2f}x the teacher at {target['teacher_nfe']:g} NFE "
        f"({target['nfe_reduction']:g}x fewer NFE)"
    )


def teacher_samples_target(
    row: dict,
    yardstick: dict,
    reference: dict,
    fd_limit: float,
    diversity_band: tuple[float, float],
    nfe_reduction: float = 16,
) -> dict:
    """
    Whether a few-step row matches what it was taught: its FD to the teacher's own samples (same noise, prompts and
    guidance; `fd_to_teacher` of `evaluate.py --paired_reference`) <= `fd_limit` x the yardstick's (the teacher's own
    samples at fewer NFE against the same reference), its diversity within `diversity_band` x the reference's, at
    >= `nfe_reduction` x fewer network evaluations than the reference.

    Args:
        row (`dict`): the few-step row: `nfe`, `fd_to_teacher`, `diversity`.
        yardstick (`dict`): the teacher's row at fewer NFE than the reference: `nfe`, `fd_to_teacher`.
        reference (`dict`): the teacher's row whose samples are the reference: `nfe`, `diversity`.
        fd_limit (`float`): the largest FD to the teacher's samples, in units of the yardstick's.
        diversity_band (`tuple[float, float]`): the (lowest, highest) diversity, in units of the reference's.
        nfe_reduction (`float`, defaults to 16): the least ratio of the reference's NFE to the row's.

    Returns:
        `dict`: `fd_to_teacher`, `fd_ratio_to_yardstick`, `fd_limit`, `yardstick_nfe`, `diversity_ratio`,
        `diversity_band`, `reference_nfe`, `nfe_reduction` (the reference's NFE / the row's) and `met`.
    """
    fd_ratio = row["fd_to_teacher"] / yardstick["fd_to_teacher"]
    diversity_ratio = row["diversity"] / reference["diversity"]
    reduction = reference["nfe"] / row["nfe"]
    low, high = diversity_band
    return {
        "fd_to_teacher": row["fd_to_teacher"],
        "fd_ratio_to_yardstick": fd_ratio,
        "fd_limit": fd_limit,
        "yardstick_nfe": yardstick["nfe"],
        "diversity_ratio": diversity_ratio,
        "diversity_band": [low, high],
        "reference_nfe": reference["nfe"],
        "nfe_reduction": reduction,
        "met": bool(fd_ratio <= fd_limit and low <= diversity_ratio <= high and reduction >= nfe_reduction),
    }


def describe_teacher_samples_target(name: str, target: dict) -> str:
    """One report line for a `teacher_samples_target` result."""
    low, high = target["diversity_band"]
    return (
        f"- {name}: FD to the teacher's {target['reference_nfe']:g}-NFE samples {target['fd_to_teacher']:.4g} = "
        f"{target['fd_ratio_to_yardstick']:.2f}x the teacher's own at {target['yardstick_nfe']:g} NFE (target <= "
        f"{target['fd_limit']:g}x), diversity {target['diversity_ratio']:.2f}x the teacher's "
        f"(target {low:g}-{high:g}x), {target['nfe_reduction']:g}x fewer NFE"
    )


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 in [0, 255], 3 channels (grayscale repeated), the input of the Inception network."""
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images


class InceptionFeatures:
    """
    The standard 2048-d pool features of FID's InceptionV3 (TensorFlow's 2015-12-05 weights), through an installed
    package. Nothing is downloaded here: the weights must already be on disk.

    Args:
        backend (`str`, defaults to "auto"): "torch-fidelity" (`pip install torch-fidelity`; weights from
            `weights_path` or torch's hub cache, where `torch_fidelity` itself stores them), "clean-fid"
            (`pip install clean-fid`; its TorchScript file `inception-2015-12-05.pt` from `weights_path` or `/tmp`,
            where clean-fid stores it), or "auto" (the first that is installed and has its weights).
        weights_path (`str`, *optional*): a local weights file for the chosen backend.
        device: where the network runs.

    The torch-fidelity state dict is read with `torch.load(weights_only=True)` (tensors only, no code).
    """

    TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
    CLEAN_FID_FILE = "inception-2015-12-05.pt"

    def __init__(self, backend: str = "auto", weights_path: str | None = None, device="cpu"):
        self.device = torch.device(device)
        errors = []
        for name in ("torch-fidelity", "clean-fid") if backend == "auto" else (backend,):
            if name not in ("torch-fidelity", "clean-fid"):
                raise ValueError(f"Unknown Inception backend {name!r}: use 'torch-fidelity', 'clean-fid' or 'auto'.")
            try:
                self._fn = getattr(self, "_build_" + name.replace("-", "_"))(weights_path)
                self.backend = name
                return
            except (ImportError, FileNotFoundError) as e:
                errors.append(f"{name}: {e}")
        raise RuntimeError(
            "FID needs the Inception network, and none could be loaded without downloading:\n  "
            + "\n  ".join(errors)
            + "\nInstall the `metrics` extra (`pip install -e '.[metrics]'`), fetch the weights once with the backend's "
            "own tools on a machine with network access, or pass a local file (`--inception_weights PATH`)."
        )

    def _build_torch_fidelity(self, weights_path):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as e:
            raise ImportError("torch-fidelity is not installed (`pip install torch-fidelity`)") from e
        path = weights_path or os.path.join(torch.hub.get_dir(), "checkpoints", self.TORCH_FIDELITY_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no weights file at {path}")
        import tempfile

        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only
        with tempfile.TemporaryDirectory() as tmp:  # torch-fidelity reads a path; give it the tensors-only copy
            safe_copy = os.path.join(tmp, "inception.pth")
            torch.save(state, safe_copy)
            model = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=safe_copy
            )
        model = model.to(self.device)
        return lambda images: model(images)[0]

    def _build_clean_fid(self, weights_path):
        try:
            from cleanfid.inception_torchscript import InceptionV3W
        except ImportError as e:
            raise ImportError("clean-fid is not installed (`pip install clean-fid`)") from e
        path = weights_path or os.path.join("/tmp", self.CLEAN_FID_FILE)
        if os.path.basename(path) != self.CLEAN_FID_FILE or not os.path.isfile(path):
            raise FileNotFoundError(f"no weights file at {path} (clean-fid needs it named {self.CLEAN_FID_FILE})")
        # A TorchScript archive (no Python code is unpickled); it resizes to 299 inside, from values in [0, 255].
        model = InceptionV3W(os.path.dirname(path), download=False, resize_inside=True).to(self.device).eval()
        return lambda images: model(images.float())

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
        """Features (n, 2048) of images in [-1, 1] (1 or 3 channels, any size)."""
        out = [
            self._fn(to_uint8(images[i : i + batch_size]).to(self.device)).double().cpu()
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out)


def fid(images: torch.Tensor, reference: torch.Tensor, extractor: "InceptionFeatures | None" = None) -> float:
    """FID: the Frechet distance of Inception features (`InceptionFeatures`) of two image sets in [-1, 1]."""
    extractor = extractor or InceptionFeatures()
    return frechet_distance(*feature_statistics(extractor(images)), *feature_statistics(extractor(reference)))
