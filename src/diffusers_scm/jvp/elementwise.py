"""Forward-mode rules for the elementwise ops of a JVP pass without gradients (SPEC.md section 6).

PyTorch's forward-mode AD gives `x * c` with a constant `c` (a tensor without a tangent, or a number) the tangent
`dx * c + 0 * x`, where the zero is an "efficient zero tensor" whose arithmetic runs through Python decompositions:
on CPU `x * c` then costs about 6x a plain multiplication instead of 2x, `x + c` about 4x instead of 1x, `torch.cat`
8x and `x.pow(2)` 17x. Modulations (`x * (1 + scale) + shift`), rotary embeddings, residual gates and time-embedding
arithmetic are made of these ops, so in a transformer they cost about as much as its matmuls. The rules here compute
the primal from the primals and the tangent from the op's derivative directly:

    d(x c) = dx c,  d(x y) = dx y + x dy,  d(x + c) = dx,  d(x / c) = dx / c,  d(c / y) = -(c / y) dy / y,
    d(x^n) = n x^(n-1) dx,  d cat(x_i) = cat(dx_i),  d addcmul(a, b, c, v) = da + v (db c + b dc),
    d mean(x) = mean(dx),  d sum(x) = sum(dx).

`elementwise_jvp` returns None where a rule does not apply (no input carries a tangent, gradients are recorded,
an `out=` or rounding-mode argument, a tensor exponent), and the op then runs with PyTorch's own rule.
"""

import torch


fwAD = torch.autograd.forward_ad

__all__ = ["elementwise_jvp", "make_dual"]


def _split(x):
    """(primal, tangent) of a tensor (tangent None without one), or (x, None) for a number."""
    if isinstance(x, torch.Tensor):
        return fwAD.unpack_dual(x)[:2]
    return x, None


def make_dual(primal: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """`primal` with `tangent`, the tangent cast to the primal's dtype and broadcast to its shape."""
    if tangent.dtype != primal.dtype:
        tangent = tangent.to(primal.dtype)
    if tangent.shape != primal.shape:
        tangent = tangent.expand(primal.shape)
    return fwAD.make_dual(primal, tangent)


def _scaled(t, alpha):
    return t if alpha == 1 else t * alpha


def _add(a, b, alpha=1, sign=1):
    """a + sign alpha b (add: sign 1; sub: sign -1)."""
    (pa, ta), (pb, tb) = _split(a), _split(b)
    if ta is None and tb is None:
        return None
    if alpha == 1:  # the Python operators also take a number on the left
        out = pa + pb if sign == 1 else pa - pb
    else:
        out = torch.add(pa, pb, alpha=alpha) if sign == 1 else torch.sub(pa, pb, alpha=alpha)
    if tb is None:
        return make_dual(out, ta)
    tb = _scaled(tb, sign * alpha)
    return make_dual(out, tb if ta is None else ta + tb)


def _mul(a, b):
    (pa, ta), (pb, tb) = _split(a), _split(b)
    if ta is None and tb is None:
        return None
    out = pa * pb
    if tb is None:
        return make_dual(out, ta * pb)
    if ta is None:
        return make_dual(out, pa * tb)
    return make_dual(out, torch.addcmul(ta * pb, pa, tb))


def _div(a, b):
    (pa, ta), (pb, tb) = _split(a), _split(b)
    if ta is None and tb is None:
        return None
    out = pa / pb
    if tb is None:
        return make_dual(out, ta / pb)
    # d(a / b) = (da - (a / b) db) / b
    tangent = -out * tb if ta is None else ta - out * tb
    return make_dual(out, tangent / pb)


def _pow(x, exponent):
    px, tx = _split(x)
    if tx is None or isinstance(exponent, torch.Tensor) or isinstance(exponent, bool):
        return None
    if exponent == 0:
        return make_dual(px.pow(0), torch.zeros_like(tx))
    if exponent == 2:
        return make_dual(px * px, 2 * px * tx)
    return make_dual(px.pow(exponent), exponent * px.pow(exponent - 1) * tx)


def _addcmul(a, b, c, value=1):
    (pa, ta), (pb, tb), (pc, tc) = _split(a), _split(b), _split(c)
    if ta is None and tb is None and tc is None:
        return None
    out = torch.addcmul(pa, pb, pc, value=value)
    # d(a + v b c) = da + v (db c + b dc)
    product = None
    if tb is not None:
        product = tb * pc
    if tc is not None:
        product = pb * tc if product is None else torch.addcmul(product, pb, tc)
    if product is None:
        return make_dual(out, ta)
    product = _scaled(product, value)
    return make_dual(out, product if ta is None else ta + product)


def _cat(tensors, dim=0):
    parts = [_split(x) for x in tensors]
    if all(t is None for _, t in parts):
        return None
    out = torch.cat([p for p, _ in parts], dim)
    tangent = torch.cat(
        [torch.zeros_like(p, dtype=out.dtype) if t is None else t.to(out.dtype) for p, t in parts], dim
    )
    return make_dual(out, tangent)


def _linear_op(func):
    """A linear op (mean, sum): the same op on the tangent."""

    def rule(x, *args, **kwargs):
        px, tx = _split(x)
        if tx is None:
            return None
        return make_dual(func(px, *args, **kwargs), func(tx, *args, **kwargs))

    return rule


def _swap(rule):
    """A reflected operator: `x.__rsub__(y)` is `y - x`."""
    return lambda x, y: rule(y, x)


T = torch.Tensor
_RULES = {
    **dict.fromkeys((torch.add, T.add, T.__add__, T.__radd__), _add),
    **dict.fromkeys((torch.sub, torch.subtract, T.sub, T.__sub__), lambda a, b, alpha=1: _add(a, b, alpha, -1)),
    T.__rsub__: _swap(lambda a, b: _add(a, b, 1, -1)),
    **dict.fromkeys((torch.mul, torch.multiply, T.mul, T.__mul__, T.__rmul__), _mul),
    **dict.fromkeys((torch.div, torch.true_divide, T.div, T.__truediv__), _div),
    T.__rtruediv__: _swap(_div),
    **dict.fromkeys((torch.pow, T.pow, T.__pow__), _pow),
    **dict.fromkeys((torch.square, T.square), lambda x: _pow(x, 2)),
    **dict.fromkeys((torch.addcmul, T.addcmul), _addcmul),
    **dict.fromkeys((torch.cat, torch.concat, torch.concatenate), _cat),
    **{f: _linear_op(f) for f in (torch.mean, T.mean, torch.sum, T.sum)},
}
del T

# keyword arguments the rules take; any other (out=, rounding_mode=, dtype=, ...) leaves the op to PyTorch
_KWARGS = {"alpha", "value", "dim", "keepdim", "axis"}


def elementwise_jvp(func, args, kwargs):
    """`func(*args, **kwargs)` by the rules above when one applies (in a JVP pass without gradients), else None."""
    rule = _RULES.get(func)
    if rule is None or torch.is_grad_enabled() or not kwargs.keys() <= _KWARGS:
        return None
    if "axis" in kwargs:
        kwargs = {("dim" if k == "axis" else k): v for k, v in kwargs.items()}
    try:
        return rule(*args, **kwargs)
    except TypeError:  # a signature the rule does not take (e.g. a dtype argument of sum): PyTorch's own rule
        return None
