"""Metrics against closed forms, and the digits classifier's accuracy."""

import numpy as np
import pytest
import torch

from diffusers_scm.metrics import (
    feature_statistics,
    frechet_distance,
    load_digits_classifier,
    paired_rmse,
    train_digits_classifier,
)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    # diagonal covariances: FD = ||mu1 - mu2||^2 + sum (s1 - s2)^2
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.5, 2, size=5), rng.uniform(0.5, 2, size=5)
    expected = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    assert abs(frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2)) - expected) < 1e-10
    # commuting full covariances (same eigenvectors): FD = ||dmu||^2 + sum (sqrt(l1) - sqrt(l2))^2
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    l1, l2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    fd = frechet_distance(np.zeros(6), q @ np.diag(l1) @ q.T, np.ones(6), q @ np.diag(l2) @ q.T)
    assert abs(fd - (6 + ((np.sqrt(l1) - np.sqrt(l2)) ** 2).sum())) < 1e-9
    # identical distributions, and a singular covariance stays finite and >= 0
    a = rng.normal(size=(4, 4))
    sing = a @ np.diag([1, 1, 0, 0]) @ a.T
    # (square roots of eigenvalues at rounding level, ~1e-15, contribute ~1e-8 each)
    assert abs(frechet_distance(np.zeros(4), sing, np.zeros(4), sing)) < 1e-6
    with pytest.raises(ValueError, match="Shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_frechet_distance_from_samples_converges_to_the_gaussian_value():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200000, 3, generator=g, dtype=torch.float64)
    y = torch.randn(200000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]) + 1.0
    fd = frechet_distance(*feature_statistics(x), *feature_statistics(y))
    assert abs(fd - (3.0 + 0 + 1.0 + 0.25)) < 0.05


def test_paired_rmse():
    a = torch.zeros(4, 2, 3, 3)
    b = torch.full((4, 2, 3, 3), 2.0)
    assert abs(paired_rmse(a, b) - 2.0) < 1e-12


def test_digits_classifier_accuracy_and_cache(tmp_path):
    model, accuracy = train_digits_classifier()
    assert accuracy >= 0.95, accuracy
    cached, cached_acc = load_digits_classifier(str(tmp_path))
    again, again_acc = load_digits_classifier(str(tmp_path))  # from the cache file
    assert cached_acc == again_acc and abs(cached_acc - accuracy) < 1e-6
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(cached.embed(x), again.embed(x))
    torch.testing.assert_close(cached.embed(x), model.embed(x))  # deterministic training


def test_few_step_target_compares_with_the_teacher_at_16x_the_nfe():
    from diffusers_scm.metrics import describe_target, few_step_target

    teacher = [{"nfe": n, "fd_digits": fd} for n, fd in ((8, 50.0), (16, 48.0), (32, 49.0), (64, 48.5))]
    two = few_step_target(teacher, {"nfe": 2, "fd_digits": 52.0}, 1.15)
    # best overall at 16 NFE (48.0); among the rows at >= 32 NFE the best is 64 NFE (48.5)
    assert two["ratio"] == pytest.approx(52.0 / 48.0) and two["met"]
    assert two["teacher_nfe"] == 64 and two["nfe_reduction"] == 32
    assert two["ratio_at_nfe"] == pytest.approx(52.0 / 48.5)
    assert "1.08x the teacher's best" in describe_target("2-step", two) and "32x fewer NFE" in describe_target("", two)
    assert not few_step_target(teacher, {"nfe": 2, "fd_digits": 56.0}, 1.15)["met"]  # 1.17x
    short = few_step_target(teacher[:2], {"nfe": 2, "fd_digits": 40.0}, 1.15)  # teacher only up to 16 NFE
    assert not short["met"] and short["teacher_nfe"] is None and short["nfe_reduction"] == 0.0
    one = few_step_target(teacher, {"nfe": 1, "fd_digits": 60.0}, 1.5)
    assert one["met"] and one["teacher_nfe"] == 16 and one["ratio_at_nfe"] == pytest.approx(1.25)


def test_group_diversity_against_closed_forms_and_a_loop():
    from itertools import combinations

    from diffusers_scm.metrics import group_diversity, mean_pairwise_distance

    # a regular simplex: every pair of the scaled basis vectors s e_i is s sqrt(2) apart
    assert mean_pairwise_distance(3.0 * np.eye(5)) == pytest.approx(3.0 * np.sqrt(2), rel=1e-12)
    assert mean_pairwise_distance(np.ones((4, 7))) == 0.0  # one image for every noise
    # 1-d Gaussian N(0, s^2): E|x - y| = 2 s / sqrt(pi)
    x = torch.randn(3000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.5
    assert mean_pairwise_distance(x) == pytest.approx(2 * 1.5 / np.sqrt(np.pi), rel=0.02)
    # groups: sample i belongs to group i mod 3; group 2 has a single sample (NaN)
    rng = np.random.default_rng(1)
    features = rng.normal(size=(8, 4))
    features[0::3] = features[0]  # group 0: three copies of one point
    per_group = group_diversity(torch.from_numpy(features), 3)
    members = features[1::3]
    loop = np.mean([np.linalg.norm(a - b) for a, b in combinations(members, 2)])
    assert per_group[0] == 0.0 and per_group[1] == pytest.approx(loop, rel=1e-12)
    assert group_diversity(features[:5], 3)[2] != group_diversity(features[:5], 3)[2]  # NaN: one sample
    assert group_diversity(features, 1)[0] == pytest.approx(
        np.mean([np.linalg.norm(a - b) for a, b in combinations(features, 2)]), rel=1e-12
    )
    with pytest.raises(ValueError, match="n >= 2"):
        mean_pairwise_distance(np.zeros((1, 3)))


def test_teacher_samples_target_fails_a_collapsed_student():
    """FD to the teacher's samples in units of the teacher's own at fewer NFE, diversity in units of the reference's,
    NFE reduction to the reference; a student that draws each prompt's mean teacher image fails however close its FD."""
    from diffusers_scm.metrics import (
        describe_teacher_samples_target,
        fd_digits,
        group_diversity,
        load_digits_classifier,
        teacher_samples_target,
    )
    from diffusers_scm.training.data import DigitsDataset

    yardstick = {"nfe": 8, "fd_to_teacher": 0.5}
    reference = {"nfe": 64, "diversity": 4.0}
    one = teacher_samples_target({"nfe": 1, "fd_to_teacher": 1.4, "diversity": 3.0}, yardstick, reference, 3, (0.5, 2))
    assert one["fd_ratio_to_yardstick"] == pytest.approx(2.8) and one["diversity_ratio"] == pytest.approx(0.75)
    assert one["nfe_reduction"] == 64 and one["met"]
    line = describe_teacher_samples_target("sCD 1-step", one)
    assert "2.80x the teacher's own at 8 NFE (target <= 3x)" in line and "diversity 0.75x" in line
    assert not teacher_samples_target(
        {"nfe": 1, "fd_to_teacher": 1.6, "diversity": 3.0}, yardstick, reference, 3, (0.5, 2)
    )["met"]
    assert not teacher_samples_target(
        {"nfe": 1, "fd_to_teacher": 1.0, "diversity": 9.0}, yardstick, reference, 3, (0.5, 2)
    )["met"]
    slow = teacher_samples_target(
        {"nfe": 8, "fd_to_teacher": 0.1, "diversity": 4.0}, yardstick, reference, 3, (0.5, 2)
    )
    assert slow["nfe_reduction"] == 8 and not slow["met"]  # 8x fewer NFE than the reference: not >= 16x

    # a "teacher" whose samples are the digits (image i of digit i mod 10), and a student drawing each digit's mean
    classifier, _ = load_digits_classifier()
    data = DigitsDataset(8, "train")
    order = torch.cat([torch.nonzero(data.labels == d).flatten()[:40] for d in range(10)])
    teacher = data.images[order.view(10, 40).T.flatten()]  # image i: digit i mod 10
    means = torch.stack([teacher[d::10].mean(0) for d in range(10)])
    student = means.repeat(40, 1, 1, 1)
    with torch.no_grad():
        teacher_diversity = group_diversity(classifier.embed(teacher), 10)
        student_diversity = group_diversity(classifier.embed(student), 10)
    assert (student_diversity < 1e-6).all() and (teacher_diversity > 0.5).all()
    row = {"nfe": 1, "fd_to_teacher": fd_digits(student, teacher, classifier), "diversity": student_diversity.mean()}
    collapsed = teacher_samples_target(
        row,
        {"nfe": 8, "fd_to_teacher": 10 * row["fd_to_teacher"]},
        {"nfe": 64, "diversity": teacher_diversity.mean()},
        3,
        (0.5, 2),
    )
    assert collapsed["fd_ratio_to_yardstick"] <= 3 and collapsed["diversity_ratio"] < 1e-6 and not collapsed["met"]
