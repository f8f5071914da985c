"""`eqtrace.nn`: layers and recurrent cells against plain-`jnp` references built from their weights."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqtrace
import eqtrace.nn as enn

from .helpers import assert_tree_allclose


IN, HID, BATCH, TIME = 3, 5, 4, 6


def _affine(lin, v):
    y = v @ lin.weight
    return y if lin.bias is None else y + lin.bias


def _cat(x, h):
    return jnp.concatenate([x, h])


def _sigmoid(v):
    return 1 / (1 + jnp.exp(-v))


def ref_vanilla(cell, x, s):
    return enn.VanillaRNNState(h=jnp.tanh(_affine(cell.W, _cat(x, s.h))))


def ref_gru(cell, x, s):
    h = s.h
    z = _sigmoid(_affine(cell.Wz, _cat(x, h)))
    r = _sigmoid(_affine(cell.Wr, _cat(x, h)))
    cand = jnp.tanh(_affine(cell.Wh, _cat(x, r * h)))
    return enn.GRUState(h=(1 - z) * h + z * cand)


def ref_lstm(cell, x, s):
    xh = _cat(x, s.h)
    i = _sigmoid(_affine(cell.Wi, xh))
    f = _sigmoid(_affine(cell.Wf, xh))
    o = _sigmoid(_affine(cell.Wo, xh))
    g = jnp.tanh(_affine(cell.Wg, xh))
    c = f * s.c + i * g
    return enn.LSTMState(h=o * jnp.tanh(c), c=c)


def ref_mgu(cell, x, s):
    h = s.h
    f = _sigmoid(_affine(cell.Wf, _cat(x, h)))
    cand = jnp.tanh(_affine(cell.Wh, _cat(x, f * h)))
    return enn.MGUState(h=(1 - f) * h + f * cand)


def ref_minimal(cell, x, s):
    z = jnp.tanh(_affine(cell.phi, x))
    u = _sigmoid(_affine(cell.Wu, _cat(x, s.h)))
    return enn.MinimalRNNState(h=u * s.h + (1 - u) * z)


def ref_indrnn(cell, x, s):
    return enn.IndRNNState(h=jnp.maximum(_affine(cell.W, x) + cell.u * s.h, 0.0))


# (cell class, reference step, state class, number of Linear layers, number of element-wise tags)
CELLS = [
    (enn.VanillaRNNCell, ref_vanilla, enn.VanillaRNNState, 1, 0),
    (enn.GRUCell, ref_gru, enn.GRUState, 3, 0),
    (enn.LSTMCell, ref_lstm, enn.LSTMState, 4, 0),
    (enn.MGUCell, ref_mgu, enn.MGUState, 2, 0),
    (enn.MinimalRNNCell, ref_minimal, enn.MinimalRNNState, 2, 0),
    (enn.IndRNNCell, ref_indrnn, enn.IndRNNState, 1, 1),
]
CELL_IDS = [c[0].__name__ for c in CELLS]


def _random_state(cell, key):
    """A non-zero state (zeros would hide the recurrent terms), built from `init_state`'s structure."""
    leaves, treedef = jax.tree.flatten(cell.init_state())
    keys = jax.random.split(key, len(leaves))
    new = [jax.random.uniform(k, a.shape, a.dtype, 0.1, 0.9) for k, a in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, new)


def _setup(cls, dtype=jnp.float64):
    kc, kx, ks = jax.random.split(jax.random.key(0), 3)
    cell = cls(IN, HID, dtype=dtype, key=kc)
    x = jax.random.normal(kx, (IN,), dtype)
    return cell, x, _random_state(cell, ks)


# --------------------------------------------------------------------------------------------------
# Linear


@pytest.mark.parametrize("use_bias", [True, False])
def test_linear_matches_affine_map(use_bias):
    kl, kx = jax.random.split(jax.random.key(1))
    lin = enn.Linear(IN, HID, use_bias, key=kl)
    assert lin.weight.shape == (IN, HID)
    assert (lin.bias is None) != use_bias
    x = jax.random.normal(kx, (BATCH, IN))
    expected = x @ lin.weight
    if use_bias:
        expected = expected + lin.bias[None, :]
    assert_tree_allclose(lin(x), expected)


def test_linear_init_and_dtype():
    lin = enn.Linear(16, 7, dtype=jnp.float32, key=jax.random.key(2))
    assert lin.weight.dtype == jnp.float32 and lin.bias.dtype == jnp.float32
    lim = 1 / math.sqrt(16)
    assert float(jnp.max(jnp.abs(lin.weight))) <= lim
    assert float(jnp.max(jnp.abs(lin.bias))) <= lim
    assert float(jnp.std(lin.weight)) > 0.1 * lim  # not collapsed to a constant
    assert enn.Linear(2, 3, key=jax.random.key(0)).weight.dtype == jnp.float64  # default under x64


def test_linear_goes_through_etp_matmul():
    lin = enn.Linear(IN, HID, key=jax.random.key(3))
    jaxpr = jax.make_jaxpr(lin)(jnp.ones(IN))
    assert [e.primitive for e in jaxpr.eqns] == [eqtrace.etp_matmul_p]


# --------------------------------------------------------------------------------------------------
# Conv


@pytest.mark.parametrize(
    "cls, spatial, kernel, stride, padding, dilation",
    [
        (enn.Conv1d, (11,), 3, 1, "SAME", 1),
        (enn.Conv1d, (11,), (4,), 2, "VALID", 1),
        (enn.Conv1d, (11,), 3, 1, 2, 2),
        (enn.Conv2d, (7, 8), 3, 1, "SAME", 1),
        (enn.Conv2d, (7, 8), (3, 2), (2, 1), ((1, 0), (0, 2)), (1, 2)),
    ],
)
@pytest.mark.parametrize("use_bias", [True, False])
def test_conv_matches_lax(cls, spatial, kernel, stride, padding, dilation, use_bias):
    kc, kx = jax.random.split(jax.random.key(4))
    n = len(spatial)
    layer = cls(2, 3, kernel, stride, padding, dilation, use_bias, key=kc)
    k = (kernel,) * n if isinstance(kernel, int) else kernel
    assert layer.weight.shape == (3, 2) + tuple(k)
    x = jax.random.normal(kx, (2,) + spatial)
    if isinstance(padding, int):
        lax_padding = ((padding, padding),) * n
    else:
        lax_padding = padding
    expected = jax.lax.conv_general_dilated(
        x[None],
        layer.weight,
        window_strides=(stride,) * n if isinstance(stride, int) else stride,
        padding=lax_padding,
        rhs_dilation=(dilation,) * n if isinstance(dilation, int) else dilation,
    )[0]
    if use_bias:
        expected = expected + jnp.broadcast_to(layer.bias.reshape((3,) + (1,) * n), expected.shape)
    got = layer(x)
    assert got.shape == expected.shape
    assert_tree_allclose(got, expected)
    # Batched with vmap, as Equinox layers are.
    xb = jnp.stack([x, 2 * x])
    assert_tree_allclose(jax.vmap(layer)(xb)[1], layer(2 * x))


def test_conv_init_bounds_and_errors():
    layer = enn.Conv2d(4, 6, (3, 2), key=jax.random.key(5))
    lim = 1 / math.sqrt(4 * 3 * 2)
    assert float(jnp.max(jnp.abs(layer.weight))) <= lim
    assert float(jnp.max(jnp.abs(layer.bias))) <= lim
    with pytest.raises(ValueError, match="x"):
        layer(jnp.ones((1, 4, 5, 5)))  # batched input: use vmap
    with pytest.raises(ValueError, match="kernel_size"):
        enn.Conv2d(4, 6, (3, 3, 3), key=jax.random.key(5))
    with pytest.raises(ValueError, match="padding"):
        enn.Conv1d(4, 6, 3, padding="FULL", key=jax.random.key(5))
    with pytest.raises(TypeError):
        enn.AbstractConv(1, 1, 1, key=jax.random.key(5))  # abstract: no `num_spatial_dims`


@pytest.mark.parametrize("cls", [enn.Conv1d, enn.Conv2d])
@pytest.mark.parametrize("arg", ["in_channels", "out_channels"])
@pytest.mark.parametrize("bad", [0, -2])
def test_conv_bad_sizes(cls, arg, bad):
    kwargs = dict(in_channels=2, out_channels=3, kernel_size=3)
    kwargs[arg] = bad
    with pytest.raises(ValueError, match=rf"`{arg}`.*{bad}"):
        cls(**kwargs, key=jax.random.key(0))


# --------------------------------------------------------------------------------------------------
# Recurrent cells


@pytest.mark.parametrize("cls, ref, state_cls, n_linear, n_elementwise", CELLS, ids=CELL_IDS)
def test_cell_matches_reference(cls, ref, state_cls, n_linear, n_elementwise):
    cell, x, s = _setup(cls)
    out = cell(x, s)
    assert type(out) is state_cls
    assert_tree_allclose(out, ref(cell, x, s))
    # The recurrence is live: another state gives another output.
    other = jax.tree.map(lambda a: a * 0.5, s)
    assert not jnp.allclose(cell(x, other).h, out.h)


@pytest.mark.parametrize("cls, ref, state_cls, n_linear, n_elementwise", CELLS, ids=CELL_IDS)
def test_cell_gradients_match_reference(cls, ref, state_cls, n_linear, n_elementwise):
    cell, x, s = _setup(cls)

    def loss(step, c, x, s):
        return sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(step(c, x, s)))

    got = eqx.filter_grad(lambda c, x, s: loss(lambda c, x, s: c(x, s), c, x, s))(cell, x, s)
    expected = eqx.filter_grad(lambda c, x, s: loss(ref, c, x, s))(cell, x, s)
    assert_tree_allclose(got, expected)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(got))


@pytest.mark.parametrize("cls, ref, state_cls, n_linear, n_elementwise", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_cell_shapes_and_dtypes(cls, ref, state_cls, n_linear, n_elementwise, dtype):
    cell, x, s = _setup(cls, dtype)
    s0 = cell.init_state()
    assert type(s0) is state_cls
    for leaf in jax.tree.leaves(s0):
        assert leaf.shape == (HID,) and leaf.dtype == dtype
        assert not jnp.any(leaf)
    assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(eqx.filter(cell, eqx.is_array)))
    for out in (cell(x, s0), cell(x, s)):
        assert jax.tree.structure(out) == jax.tree.structure(s0)
        for leaf in jax.tree.leaves(out):
            assert leaf.shape == (HID,) and leaf.dtype == dtype


@pytest.mark.parametrize("cls, ref, state_cls, n_linear, n_elementwise", CELLS, ids=CELL_IDS)
def test_cell_uses_etp_ops(cls, ref, state_cls, n_linear, n_elementwise):
    """Every weight goes through its own ETP op; gates are not sliced out of one matmul."""
    cell, x, s = _setup(cls)
    prims = [e.primitive for e in jax.make_jaxpr(lambda x, s: cell(x, s))(x, s).eqns]
    assert prims.count(eqtrace.etp_matmul_p) == n_linear
    assert prims.count(eqtrace.etp_element_wise_p) == n_elementwise
    assert jax.lax.slice_p not in prims and jax.lax.split_p not in prims


@pytest.mark.parametrize("cls, ref, state_cls, n_linear, n_elementwise", CELLS, ids=CELL_IDS)
def test_cell_jit(cls, ref, state_cls, n_linear, n_elementwise):
    cell, x, s = _setup(cls)
    assert_tree_allclose(eqx.filter_jit(lambda c, x, s: c(x, s))(cell, x, s), ref(cell, x, s))
    assert_tree_allclose(jax.jit(lambda x, s: cell(x, s))(x, s), ref(cell, x, s))


@pytest.mark.parametrize("cls, ref, state_cls, n_linear, n_elementwise", CELLS, ids=CELL_IDS)
def test_cell_vmap(cls, ref, state_cls, n_linear, n_elementwise):
    cell, _, _ = _setup(cls)
    kx, ks = jax.random.split(jax.random.key(7))
    xs = jax.random.normal(kx, (BATCH, IN))
    ss = jax.vmap(lambda k: _random_state(cell, k))(jax.random.split(ks, BATCH))
    got = jax.vmap(cell)(xs, ss)
    for b in range(BATCH):
        s_b = jax.tree.map(lambda a, b=b: a[b], ss)
        assert_tree_allclose(jax.tree.map(lambda a, b=b: a[b], got), ref(cell, xs[b], s_b))


@pytest.mark.parametrize("cls, ref, state_cls, n_linear, n_elementwise", CELLS, ids=CELL_IDS)
def test_cell_scan_over_time(cls, ref, state_cls, n_linear, n_elementwise):
    cell, _, _ = _setup(cls)
    xs = jax.random.normal(jax.random.key(8), (TIME, IN))

    def step(s, x):
        s = cell(x, s)
        return s, s

    final, trajectory = jax.lax.scan(step, cell.init_state(), xs)
    s = cell.init_state()
    for t in range(TIME):
        s = ref(cell, xs[t], s)
        assert_tree_allclose(jax.tree.map(lambda a, t=t: a[t], trajectory), s)
    assert_tree_allclose(final, s)
    assert float(jnp.max(jnp.abs(final.h))) > 0


@pytest.mark.parametrize("cls", [c[0] for c in CELLS], ids=CELL_IDS)
@pytest.mark.parametrize("arg", ["input_size", "hidden_size"])
@pytest.mark.parametrize("bad", [0, -3, True])
def test_cell_bad_sizes(cls, arg, bad):
    kwargs = dict(input_size=IN, hidden_size=HID)
    kwargs[arg] = bad
    with pytest.raises(ValueError, match=rf"`{arg}`.*{bad}"):
        cls(**kwargs, key=jax.random.key(0))
    # A non-integer size is refused too (a `TypeError` when the jaxtyping hook checks annotations).
    kwargs[arg] = 2.5
    with pytest.raises((TypeError, ValueError), match=arg):
        cls(**kwargs, key=jax.random.key(0))


@pytest.mark.parametrize("cls", [c[0] for c in CELLS], ids=CELL_IDS)
def test_cell_bad_dtype_and_input(cls):
    with pytest.raises(TypeError, match="dtype"):
        cls(IN, HID, dtype=jnp.int32, key=jax.random.key(0))
    cell = cls(IN, HID, dtype=jnp.float64, key=jax.random.key(0))
    with pytest.raises(TypeError, match="dtype"):
        cell(jnp.ones(IN, jnp.float32), cell.init_state())  # no silent promotion
    with pytest.raises((TypeError, ValueError), match="x"):
        cell(jnp.ones((2, IN)), cell.init_state())  # batched input: use vmap


def test_cell_specifics():
    assert enn.ValinaRNNCell is enn.VanillaRNNCell
    lstm = enn.LSTMCell(IN, HID, key=jax.random.key(0))
    assert_tree_allclose(lstm.Wf.bias, jnp.ones(HID))
    assert lstm.Wi.bias is not None and not jnp.allclose(lstm.Wi.bias, 1.0)
    ind = enn.IndRNNCell(IN, 64, key=jax.random.key(0))
    assert ind.u.shape == (64,)
    assert bool(jnp.all((ind.u > 0) & (ind.u < 1)))
    no_bias = enn.GRUCell(IN, HID, use_bias=False, key=jax.random.key(0))
    assert no_bias.Wz.bias is None and no_bias.Wr.bias is None and no_bias.Wh.bias is None
    # Custom activation is used.
    relu_rnn = enn.VanillaRNNCell(IN, HID, activation=jax.nn.relu, key=jax.random.key(1))
    out = relu_rnn(-10 * jnp.ones(IN), relu_rnn.init_state())
    assert bool(jnp.all(out.h >= 0))
    assert_tree_allclose(out.h, jax.nn.relu(_affine(relu_rnn.W, _cat(-10 * jnp.ones(IN), jnp.zeros(HID)))))


def test_hidden_vector_states_are_one_class():
    """The cells whose state is `h` alone share one state class, under each cell's name too."""
    for name in ("GRUState", "MGUState", "MinimalRNNState", "IndRNNState"):
        assert getattr(enn, name) is enn.VanillaRNNState
    structures = [
        jax.tree.structure(cls(IN, HID, key=jax.random.key(0)).init_state())
        for cls, _, state_cls, _, _ in CELLS
        if state_cls is enn.VanillaRNNState
    ]
    assert len(structures) == 5
    assert all(s == structures[0] for s in structures)
    lstm = enn.LSTMCell(IN, HID, key=jax.random.key(0))
    assert jax.tree.structure(lstm.init_state()) != structures[0]


def test_weight_paths():
    """Weight paths that the compiler and the docs refer to."""

    def paths(module):
        leaves = jax.tree_util.tree_leaves_with_path(eqx.filter(module, eqx.is_array))
        return {tuple(k.name for k in path) for path, _ in leaves}

    key = jax.random.key(0)
    assert paths(enn.VanillaRNNCell(IN, HID, key=key)) == {("W", "weight"), ("W", "bias")}
    assert paths(enn.GRUCell(IN, HID, key=key)) == {
        (g, p) for g in ("Wz", "Wr", "Wh") for p in ("weight", "bias")
    }
    assert paths(enn.LSTMCell(IN, HID, key=key)) == {
        (g, p) for g in ("Wi", "Wf", "Wo", "Wg") for p in ("weight", "bias")
    }
    assert paths(enn.MGUCell(IN, HID, key=key)) == {(g, p) for g in ("Wf", "Wh") for p in ("weight", "bias")}
    assert paths(enn.MinimalRNNCell(IN, HID, key=key)) == {
        (g, p) for g in ("phi", "Wu") for p in ("weight", "bias")
    }
    assert paths(enn.IndRNNCell(IN, HID, key=key)) == {("W", "weight"), ("W", "bias"), ("u",)}


# --------------------------------------------------------------------------------------------------
# Initialisation: the same parameters from the same key, written out with `jax.random`


def _weights(module):
    """The array leaves of `module`, by weight path."""
    leaves = jax.tree_util.tree_leaves_with_path(eqx.filter(module, eqx.is_array))
    return {tuple(k.name for k in path): leaf for path, leaf in leaves}


def _ref_linear(name, key, n_in, n_out, use_bias, dtype):
    """`Linear(n_in, n_out)`: weight then bias from the two halves of `key`, uniform in ±1/√n_in."""
    wkey, bkey = jax.random.split(key)
    lim = 1 / math.sqrt(n_in)
    out = {(name, "weight"): jax.random.uniform(wkey, (n_in, n_out), dtype, -lim, lim)}
    if use_bias:
        out[(name, "bias")] = jax.random.uniform(bkey, (n_out,), dtype, -lim, lim)
    return out


def _ref_gates(names, key, n_in, use_bias, dtype):
    """One `Linear(n_in, HID)` per gate, each from its own part of `jax.random.split(key, len(names))`."""
    out = {}
    for name, k in zip(names, jax.random.split(key, len(names)), strict=True):
        out |= _ref_linear(name, k, n_in, HID, use_bias, dtype)
    return out


def _ref_lstm_init(key, use_bias, dtype):
    out = _ref_gates(("Wi", "Wf", "Wo", "Wg"), key, IN + HID, use_bias, dtype)
    if use_bias:
        out[("Wf", "bias")] = jnp.ones(HID, dtype)  # the forget gate starts open
    return out


def _ref_minimal_init(key, use_bias, dtype):
    pkey, ukey = jax.random.split(key)
    return _ref_linear("phi", pkey, IN, HID, use_bias, dtype) | _ref_linear(
        "Wu", ukey, IN + HID, HID, use_bias, dtype
    )


def _ref_indrnn_init(key, use_bias, dtype):
    wkey, ukey = jax.random.split(key)
    u = jax.random.uniform(ukey, (HID,), dtype, 0.0, 1.0)
    return _ref_linear("W", wkey, IN, HID, use_bias, dtype) | {("u",): u}


REF_INIT = {
    enn.VanillaRNNCell: lambda key, b, dt: _ref_linear("W", key, IN + HID, HID, b, dt),
    enn.GRUCell: lambda key, b, dt: _ref_gates(("Wz", "Wr", "Wh"), key, IN + HID, b, dt),
    enn.LSTMCell: _ref_lstm_init,
    enn.MGUCell: lambda key, b, dt: _ref_gates(("Wf", "Wh"), key, IN + HID, b, dt),
    enn.MinimalRNNCell: _ref_minimal_init,
    enn.IndRNNCell: _ref_indrnn_init,
}


def _assert_same_weights(got, expected, dtype):
    assert got.keys() == expected.keys()
    for path, leaf in expected.items():
        assert got[path].dtype == dtype, path
        assert bool(jnp.array_equal(got[path], leaf)), path


@pytest.mark.parametrize("cls", [c[0] for c in CELLS], ids=CELL_IDS)
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_cell_init_from_key(cls, use_bias, dtype):
    key = jax.random.key(42)
    cell = cls(IN, HID, use_bias=use_bias, dtype=dtype, key=key)
    _assert_same_weights(_weights(cell), REF_INIT[cls](key, use_bias, dtype), dtype)


@pytest.mark.parametrize("neuron", ["lif", "alif"])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_spiking_layer_and_readout_init_from_key(neuron, use_bias, dtype):
    key = jax.random.key(42)
    ff = enn.FeedForwardSpikingLayer(IN, HID, neuron=neuron, use_bias=use_bias, dtype=dtype, key=key)
    _assert_same_weights(_weights(ff), _ref_linear("W", key, IN, HID, use_bias, dtype), dtype)
    rec = enn.RecurrentSpikingLayer(IN, HID, neuron=neuron, use_bias=use_bias, dtype=dtype, key=key)
    _assert_same_weights(_weights(rec), _ref_linear("W", key, IN + HID, HID, use_bias, dtype), dtype)
    readout = enn.LeakyRateReadout(IN, HID, use_bias=use_bias, dtype=dtype, key=key)
    _assert_same_weights(_weights(readout), _ref_linear("W", key, IN, HID, use_bias, dtype), dtype)


@pytest.mark.parametrize("cls, kernel", [(enn.Conv1d, (3,)), (enn.Conv2d, (3, 2))])
@pytest.mark.parametrize("use_bias", [True, False])
def test_conv_init_from_key(cls, kernel, use_bias):
    key = jax.random.key(42)
    layer = cls(2, 4, kernel, use_bias=use_bias, key=key)
    wkey, bkey = jax.random.split(key)
    lim = 1 / math.sqrt(2 * math.prod(kernel))
    expected = {("weight",): jax.random.uniform(wkey, (4, 2) + kernel, jnp.float64, -lim, lim)}
    if use_bias:
        expected[("bias",)] = jax.random.uniform(bkey, (4,), jnp.float64, -lim, lim)
    _assert_same_weights(_weights(layer), expected, jnp.float64)


def test_neuron_init():
    """A learnt `tau` starts at its value in every neuron; a fixed one is no leaf."""
    for cls in (enn.LIF, enn.ALIF):
        assert _weights(cls(HID, tau=7.0)) == {}
        tau = _weights(cls(HID, tau=7.0, learn_tau=True, dtype=jnp.float32))[("tau",)]
        assert tau.dtype == jnp.float32 and bool(jnp.array_equal(tau, jnp.full(HID, 7.0, jnp.float32)))
