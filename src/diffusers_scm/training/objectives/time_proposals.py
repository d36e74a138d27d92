"""Training-time proposals in TrigFlow time: log-normal (SPEC.md section 3) and the truncated TCM Stage-2 proposals
(SPEC.md section 5)."""

import math

import torch


__all__ = [
    "lognormal_times",
    "clamp_times",
    "TRAIN_TIME_EPS",
    "student_t_times",
    "truncated_lognormal_times",
    "truncated_student_t",
    "student_t_cdf",
    "betainc",
]

# Training times stay this far from 0 and pi/2 (SPEC.md pitfall 8).
TRAIN_TIME_EPS = 1e-4


def clamp_times(t: torch.Tensor, eps: float = TRAIN_TIME_EPS) -> torch.Tensor:
    return t.clamp(eps, math.pi / 2 - eps)


def lognormal_times(
    batch_size: int,
    P_mean: float = -1.0,
    P_std: float = 1.4,
    sigma_data: float = 0.5,
    device=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """tau ~ N(P_mean, P_std^2), t = arctan(exp(tau) / sigma_data) (SPEC.md section 3), float32, shape (batch,)."""
    tau = torch.randn(batch_size, generator=generator, device=device if generator is None else generator.device)
    tau = tau.to(device) * P_std + P_mean
    return clamp_times(torch.atan(torch.exp(tau) / sigma_data))


# ---------------------------------------------------------------------------------------------------------------------
# Truncated proposals on log(sigma) for TCM Stage 2 (SPEC.md section 5): sigma = sigma_data tan t restricted to
# [sigma_min, sigma_max], sampled exactly by the inverse CDF in float64.


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _betainc_cf(a: float, b: float, x: torch.Tensor, max_iter: int = 500, tol: float = 1e-15) -> torch.Tensor:
    """Continued fraction of I_x(a, b) (modified Lentz), accurate for x < (a + 1) / (a + b + 2)."""
    tiny = 1e-300
    c = torch.ones_like(x)
    d = 1.0 - (a + b) * x / (a + 1.0)
    d = torch.where(d.abs() < tiny, torch.full_like(d, tiny), d)
    d = 1.0 / d
    h = d.clone()
    for m in range(1, max_iter + 1):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # even step
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),  # odd step
        ):
            d = 1.0 + num * d
            d = torch.where(d.abs() < tiny, torch.full_like(d, tiny), d)
            c = 1.0 + num / c
            c = torch.where(c.abs() < tiny, torch.full_like(c, tiny), c)
            d = 1.0 / d
            delta = c * d
            h = h * delta
        if (delta - 1.0).abs().max().item() < tol:
            break
    return h


def betainc(a: float, b: float, x: torch.Tensor) -> torch.Tensor:
    """Regularized incomplete beta function I_x(a, b) in float64 (continued fraction with the symmetry
    I_x(a, b) = 1 - I_{1-x}(b, a) on the side where it converges fast)."""
    x = x.double().clamp(0.0, 1.0)
    inner = (x > 0) & (x < 1)
    xs = torch.where(inner, x, torch.full_like(x, 0.5))
    swap = xs > (a + 1.0) / (a + b + 2.0)
    xa = torch.where(swap, 1.0 - xs, xs)

    def part(p, q, y):  # y^p (1 - y)^q / (p B(p, q)) * continued fraction
        front = torch.exp(p * torch.log(y) + q * torch.log1p(-y) - _log_beta(p, q)) / p
        return front * _betainc_cf(p, q, y)

    value = torch.empty_like(xa)
    if (~swap).any():
        value[~swap] = part(a, b, xa[~swap])
    if swap.any():
        value[swap] = 1.0 - part(b, a, xa[swap])
    value = torch.where(x <= 0, torch.zeros_like(x), torch.where(x >= 1, torch.ones_like(x), value))
    return value


def student_t_tail(z: torch.Tensor, df: float) -> torch.Tensor:
    """P(T > |z|) for T ~ Student-t(df): 0.5 I_{df / (df + z^2)}(df / 2, 1 / 2), float64, exact in both tails."""
    z = z.double()
    return 0.5 * betainc(0.5 * df, 0.5, df / (df + z * z))


def student_t_cdf(z: torch.Tensor, df: float) -> torch.Tensor:
    """CDF of the standard Student-t distribution with `df` degrees of freedom, float64."""
    tail = student_t_tail(z, df)
    return torch.where(z < 0, tail, 1.0 - tail)


def _student_t_log_pdf(z: torch.Tensor, df: float) -> torch.Tensor:
    norm = math.lgamma(0.5 * (df + 1)) - math.lgamma(0.5 * df) - 0.5 * math.log(df * math.pi)
    return norm - 0.5 * (df + 1) * torch.log1p(z * z / df)


def truncated_student_t(
    n: int,
    df: float,
    lower: float,
    upper: float,
    device=None,
    generator: torch.Generator | None = None,
    tol: float = 1e-12,
) -> torch.Tensor:
    """
    `n` draws of the standard Student-t(df) truncated to [lower, upper] by the exact inverse CDF, float64.

    u is uniform between the CDF values of the bounds (taken from the tail on the far side of 0, so bounds deep in a
    tail keep full precision) and z solves CDF(z) = u by Newton's method in s = asinh(z / sqrt(df)), safeguarded by
    bisection. In s the CDF of a heavy-tailed Student-t is close to linear, so Newton converges in a few steps.
    """
    if not lower < upper:
        raise ValueError(f"Empty truncation interval [{lower}, {upper}].")
    mirror = upper <= 0  # solve the mirror image in the upper half
    lo, hi = (-upper, -lower) if mirror else (lower, upper)
    bounds = torch.tensor([lo, hi], dtype=torch.float64)
    in_tail = lo >= 0  # phi(z) = -P(T > z), increasing; otherwise phi = CDF
    phi_bounds = -student_t_tail(bounds, df) if in_tail else student_t_cdf(bounds, df)
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=None if generator is None else generator.device)
    u = phi_bounds[0] + (phi_bounds[1] - phi_bounds[0]) * u.cpu()
    sq = math.sqrt(df)
    s_lo = torch.full((n,), math.asinh(lo / sq), dtype=torch.float64)
    s_hi = torch.full((n,), math.asinh(hi / sq), dtype=torch.float64)
    s = 0.5 * (s_lo + s_hi)
    root_tol = 8 * torch.finfo(torch.float64).eps
    for _ in range(200):
        z = sq * torch.sinh(s)
        phi = -student_t_tail(z, df) if in_tail else student_t_cdf(z, df)
        below = phi < u
        s_lo, s_hi = torch.where(below, s, s_lo), torch.where(below, s_hi, s)
        slope = torch.exp(_student_t_log_pdf(z, df)) * sq * torch.cosh(s)  # d phi / d s
        newton = s - (phi - u) / slope
        ok = torch.isfinite(newton) & (newton > s_lo) & (newton < s_hi)
        # per sample, converged at phi = u to rounding, at a Newton step below tol, or in a bracket narrower than
        # tol. Without the first test, a root that sits on a bracket end (Newton from the other side overshoots it by
        # rounding) is found again by bisection, some 40 CDF evaluations for no change in the result
        at_root = (phi - u).abs() <= root_tol
        done = at_root | (ok & ((newton - s).abs() < tol)) | ((s_hi - s_lo) < tol)
        s = torch.where(at_root, s, torch.where(ok, newton, 0.5 * (s_lo + s_hi)))
        if bool(done.all()):
            break
    z = sq * torch.sinh(s)
    return (-z if mirror else z).to(device)


def _sigma_bounds(sigma_min: float, sigma_max: float) -> tuple[float, float]:
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"Need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
    return math.log(sigma_min), math.log(sigma_max)


def student_t_times(
    batch_size: int,
    df: float = 0.01,
    loc: float = 0.0,
    scale: float = 0.2,
    sigma_min: float = 1.0,
    sigma_max: float = 80.0,
    sigma_data: float = 0.5,
    device=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """
    TCM Stage-2 proposal (SPEC.md section 5): ln(sigma) ~ loc + scale T, T ~ Student-t(df), truncated to
    [ln sigma_min, ln sigma_max]; t = arctan(sigma / sigma_data). Returns float32 times of shape (batch,) in
    [arctan(sigma_min / sigma_data), arctan(sigma_max / sigma_data)].

    The paper's defaults: df = 0.01, loc = 0, scale = 0.2, sigma in [1, 80], so that the lower end is the dividing time.
    """
    log_lo, log_hi = _sigma_bounds(sigma_min, sigma_max)
    z = truncated_student_t(batch_size, df, (log_lo - loc) / scale, (log_hi - loc) / scale, generator=generator)
    log_sigma = (loc + scale * z).clamp(log_lo, log_hi)
    return torch.atan(torch.exp(log_sigma) / sigma_data).float().to(device)


def truncated_lognormal_times(
    batch_size: int,
    P_mean: float = 0.0,
    P_std: float = 0.2,
    sigma_min: float = 1.0,
    sigma_max: float = 80.0,
    sigma_data: float = 0.5,
    device=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """
    ln(sigma) ~ N(P_mean, P_std^2) truncated to [ln sigma_min, ln sigma_max] (exact inverse CDF in float64, with the
    bounds taken on the lower-tail side so a truncation deep in a tail keeps its precision); t = arctan(sigma /
    sigma_data). Returns float32 times of shape (batch,).
    """
    log_lo, log_hi = _sigma_bounds(sigma_min, sigma_max)
    a, b = (log_lo - P_mean) / P_std, (log_hi - P_mean) / P_std
    flip = a > 0  # Phi(-z) = 1 - Phi(z): work where Phi is small
    lo, hi = (-b, -a) if flip else (a, b)
    cdf = torch.special.ndtr(torch.tensor([lo, hi], dtype=torch.float64))
    u = torch.rand(
        batch_size, generator=generator, dtype=torch.float64, device=None if generator is None else generator.device
    )
    z = torch.special.ndtri(cdf[0] + (cdf[1] - cdf[0]) * u.cpu()).clamp(lo, hi)
    log_sigma = (P_mean + P_std * (-z if flip else z)).clamp(log_lo, log_hi)
    return torch.atan(torch.exp(log_sigma) / sigma_data).float().to(device)
