import jax.numpy as jnp
from jaxtyping import Array, Float

from ._checks import check_operand, check_same_dtype
from ._registry import register_etp_op


def parse_spec(spec: str, num_operands: int | None = None) -> tuple[tuple[str, ...], str]:
    """The operands' index strings and the output's, of an explicit `einsum` specification."""
    if not isinstance(spec, str):
        raise TypeError(f"`eqtrace.einsum`: `spec` must be a string, got {type(spec).__name__}.")
    spec = spec.replace(" ", "")
    if spec.count("->") != 1:
        raise ValueError(
            f"`eqtrace.einsum`: `spec` must name its output explicitly ('ij,jk->ik'), got {spec!r}."
        )
    lhs, out = spec.split("->")
    terms = tuple(lhs.split(","))
    if not all(t.isalpha() and t.isascii() for t in terms if t) or not (out.isalpha() or out == ""):
        raise ValueError(
            f"`eqtrace.einsum`: `spec` may use letters only (no '...'; batch with `jax.vmap`), got {spec!r}."
        )
    if len(set(out)) != len(out) or not set(out) <= set("".join(terms)):
        raise ValueError(
            f"`eqtrace.einsum`: the output indices of {spec!r} must be distinct and each appear in "
            "an operand."
        )
    if num_operands is not None and len(terms) != num_operands:
        raise ValueError(
            f"`eqtrace.einsum`: `spec` {spec!r} names {len(terms)} operand(s), got {num_operands}."
        )
    return terms, out


def _einsum_impl(*operands, spec):
    return jnp.einsum(spec, *operands)


def _input_axes(j, *shapes, spec):
    # A weight holding every output index, in the output's order, gives each output position its own
    # entries; its other indices are summed over (or broadcast) and are its input axes.
    terms, out = parse_spec(spec)
    term = terms[j]
    if len(set(term)) != len(term) or [c for c in term if c in out] != list(out):
        return None
    return tuple(a for a, c in enumerate(term) if c not in out)


einsum_op = register_etp_op("etp_einsum", _einsum_impl, has_input=True, input_axes=_input_axes)
etp_einsum_p = einsum_op.primitive


def einsum(spec: str, x: Float[Array, "..."], *weights: Float[Array, "..."]) -> Float[Array, "..."]:
    r"""Tagged `jnp.einsum(spec, x, *weights)`: a multilinear map of the input `x` and the weights.

    Each weight whose indices include every output index, in the output's order, is
    *position-diagonal*: each output position reads its own entries of it, and D-RTRL's
    weight-shaped trace is exact per position. That holds for an index shared by the input, the
    weight and the output: in `"bi,bij->bj"` (one matrix per position `b`), `W[b, i, j]` reaches
    output `[b, j]` only, its input axis is `i`, and its trace has shape `(B, I, J, S)`. Other
    weights (`"bi,ij->bj"`, a matrix shared by every `b`) count as shared across positions, as a
    convolution's kernel.

    **Arguments:**

    - `spec`: an explicit specification, `"bi,bij->bj"`: letters only, one term per operand, the
      output after `->`.
    - `x`: the input (operand 0; not trained).
    - `weights`: one or more weights.

    **Returns:**

    `jnp.einsum(spec, x, *weights)`.

    !!! example

        ```python
        # Independent populations, each with its own input matrix: a grouped linear map.
        y = eqtrace.einsum("gi,gio->go", x, w)  # x: (G, I), w: (G, I, O)
        ```
    """
    if not weights:
        raise ValueError("`eqtrace.einsum`: give at least one weight after the input `x`.")
    terms, out = parse_spec(spec, 1 + len(weights))
    operands = (x, *weights)
    names = ["x"] + [f"weights[{i}]" for i in range(len(weights))]
    sizes: dict[str, int] = {}
    for name, term, a in zip(names, terms, operands):
        check_operand(name, a, len(term), "eqtrace.einsum")
        for c, n in zip(term, a.shape):
            if sizes.setdefault(c, n) != n:
                raise ValueError(
                    f"`eqtrace.einsum`: index {c!r} has size {sizes[c]} in one operand but {n} in `{name}` "
                    f"(shape {tuple(a.shape)})."
                )
    check_same_dtype("eqtrace.einsum", **dict(zip(names, operands)))
    return einsum_op(*operands, spec="".join([",".join(terms), "->", out]))
