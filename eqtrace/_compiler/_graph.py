"""The records of a compiled graph. All are immutable; `ETraceGraph` hashes by identity, so it can be
a static argument of `eqx.filter_jit` without retracing."""

import dataclasses
import shutil
import subprocess
import types
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from .._jax_internals import ClosedJaxpr, Primitive, Var


Path = tuple[str | int, ...]
# `jax.tree_util.PyTreeDef`, which static type checkers cannot resolve (it comes from jaxlib).
TreeDef = Any


@dataclasses.dataclass(frozen=True)
class ModuleInfo:
    """The traced step and how its flat inputs and outputs map to the user's pytrees.

    **Fields:**

    - `closed_jaxpr`: one step `(model, x, state) -> (y, new_state)`, with nested calls inlined. Its
      inputs are the array leaves of the model, then of `x`, then of `state`; its outputs the array
      leaves of `y`, then of `new_state`.
    - `weight_paths`, `input_paths`, `hidden_paths`: key paths of those leaves, in order.
    - `in_treedef`, `in_static`: how to split `(model, x, state)` into those leaves (see `flatten`).
    - `out_treedef`, `out_static`: how to rebuild `(y, new_state)` from the outputs.
    - `input_avals`, `hidden_avals`: shapes and dtypes of `x` and `state` as compiled.
    - `forward_differentiable`: `False` when the step calls a `jax.custom_vjp` function (such as an
      ODE solve with Diffrax's default adjoint), which forward-mode autodiff cannot differentiate:
      the rules then linearise the step in reverse mode.
    - `matmul_weights`: weight index → the equations of `closed_jaxpr` that use it, for the weights
      used only as the `w` of `eqtrace.matmul` (`x @ w + b`): their gradient through one step is
      `Σ xᵀ c` over those equations (`c` the cotangent at the output).
    """

    closed_jaxpr: ClosedJaxpr
    weight_paths: tuple[Path, ...]
    input_paths: tuple[Path, ...]
    hidden_paths: tuple[Path, ...]
    in_treedef: TreeDef
    in_static: tuple
    out_treedef: TreeDef
    out_static: object
    input_avals: tuple[jax.ShapeDtypeStruct, ...]
    hidden_avals: tuple[jax.ShapeDtypeStruct, ...]
    num_outputs: int
    forward_differentiable: bool = True
    matmul_weights: Mapping[int, tuple[int, ...]] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({})
    )

    @property
    def num_weights(self) -> int:
        return len(self.weight_paths)


@dataclasses.dataclass(frozen=True)
class HiddenGroup:
    """Hidden states that evolve together, position by position, within one step.

    **Fields:**

    - `index`: the group's number in the graph.
    - `hidden_paths`: key paths of the group's states in the state pytree.
    - `varshape`: the shape every state of the group shares (the positions).
    - `dtype`: their dtype.
    - `position_wise`: `True` when, holding the outputs of ETP operations fixed, each new state
      depends on the old states at its own position only; then the per-position `S×S` Jacobian
      blocks are the whole hidden Jacobian. `False` when a non-ETP operation mixes positions.
    - `recurrent`: `False` when no new state depends on an old one except through ETP operations
      (a vanilla RNN: `h' = tanh(W [x; h])`). Then `D = ∂h_t/∂h_{t-1} = 0` with ETP outputs held
      fixed: each trace of the group holds one step's value, which the learning signal carried
      back through the full step Jacobian (the default `window >= 1`) credits.
    """

    index: int
    hidden_paths: tuple[Path, ...]
    varshape: tuple[int, ...]
    dtype: jnp.dtype
    position_wise: bool = True
    recurrent: bool = True

    @property
    def num_state(self) -> int:
        """How many states the group holds (`S`)."""
        return len(self.hidden_paths)

    @property
    def num_positions(self) -> int:
        n = 1
        for d in self.varshape:
            n *= d
        return n


@dataclasses.dataclass(frozen=True)
class HiddenParamOpRelation:
    """One weight, the ETP operation it goes through, and the hidden groups that operation feeds.

    **Fields:**

    - `weight_path`: key path of the weight leaf in the model.
    - `primitive`: the ETP primitive (e.g. `etp_matmul`).
    - `hidden_groups`: the groups whose new states the operation's output `y` reaches element-wise.
    - `eqn_index`, `operand_index`: where the operation and the weight stand in the step's jaxpr.
    - `y_shape`: the shape of the operation's output.
    - `elementwise_tail`: `True`: `y → h` is element-wise, so `∂h/∂y` is diagonal and exact.
    - `position_diagonal`: `True` when each output position reads its own entries of the weight
      (`x @ W` with a vector `x`, `fn(w)`), so that a weight-shaped trace with a state axis is exact
      per position (D-RTRL). `False` for a weight shared across positions (a convolution's kernel).
    - `input_axes`: for a position-diagonal relation, the weight's axes that index no output
      position: `(0,)` for `W` in `x @ W`, `()` for a bias or `fn(w)`, `(1,)` for the `(E, I, O)`
      weight of an ensemble of `E` layers under `jax.vmap`. The weight's other axes are the output's
      positions, in order; per-position quantities act on its trace broadcast along these axes.
      With `shared_axes`, the same outside those axes of the output.
    - `shared_axes`: for a weight shared across positions along some of the output's axes (a
      convolution's kernel, shared along the spatial axes), those axes, where each output position
      reads the weight's entries along `input_axes` at the weight's other axes (the output's other
      axes, in order: a kernel's output channel). D-RTRL then keeps a trace per position along them,
      `tuple(y_shape[a] for a in shared_axes) + weight.shape + (S,)`. `()` for a position-diagonal
      relation, and for a shared weight of no such layout, which D-RTRL gives its exact gradient
      within the window only (ES-D-RTRL traces it).
    - `weight_index`: the weight's index among the model's array leaves (`module_info.weight_paths`).
    - `params`: the operation's static parameters, as its implementation takes them.
    - `operand_weights`: for each operand of the operation, the index of the model leaf it is, or
      `None` (the input, or a weight computed within the step).
    - `input_aval`: the shape and dtype of the operation's input `x` (`None` for an operation without
      one, such as `eqtrace.element_wise`).
    - `position_pad`: for an operation that reads a part of its weight (one gate of a fused
      `W @ x` that is then split), per weight axis the `(before, after)` entries outside that part;
      the rules' traces hold that part only. `()`: the whole weight.
    - `inferred`: `True` when the compiler found the operation in an untagged model
      (`compile_etrace_graph(..., infer_etp_ops=True)`), `False` for an explicitly tagged one.
    """

    weight_path: Path
    primitive: Primitive
    hidden_groups: tuple[HiddenGroup, ...]
    eqn_index: int
    operand_index: int
    y_shape: tuple[int, ...]
    elementwise_tail: bool = True
    position_diagonal: bool = True
    input_axes: tuple[int, ...] = ()
    weight_index: int = 0
    params: Mapping = dataclasses.field(default_factory=dict, compare=False)
    operand_weights: tuple[int | None, ...] = ()
    input_aval: jax.ShapeDtypeStruct | None = None
    position_pad: tuple[tuple[int, int], ...] = ()
    inferred: bool = False
    shared_axes: tuple[int, ...] = ()

    @property
    def per_position(self) -> bool:
        """Whether a trace per output position is exact for this relation (D-RTRL keeps one): the
        relation is position-diagonal, or its weight is shared along `shared_axes`."""
        return self.position_diagonal or bool(self.shared_axes)


EXCLUSION_REASONS = types.MappingProxyType(
    {
        "no_etp_op": "used by no ETP operation",
        "weight_to_weight": "transformed by other operations before it enters an ETP operation",
        "non_temporal": "its ETP operation's output reaches no hidden state (e.g. a readout)",
        "via_other_etp_op": "its ETP operation's output reaches hidden states only through another "
        "ETP operation",
        "not_element_wise": "its ETP operation's output reaches a hidden state through an operation "
        "that mixes positions",
        "untraced_use": "in a relation, but also reaches a hidden state through an operation that is "
        "not one of its traced ETP operations (partly traced)",
    }
)


@dataclasses.dataclass(frozen=True)
class ExcludedWeight:
    """A trainable leaf outside every relation. It still gets its exact gradient within the rules'
    window (with `window=1`, its same-step gradient).

    **Fields:**

    - `weight_path`: key path of the leaf in the model.
    - `reason`: one of `no_etp_op`, `stop_gradient`, `weight_to_weight`, `non_temporal`,
      `via_other_etp_op`, `not_element_wise`; or, for a weight that is partly traced, `untraced_use`.
    - `detail`: a sentence that names the operation(s) involved.
    """

    weight_path: Path
    reason: str
    detail: str


@dataclasses.dataclass(frozen=True)
class HiddenPerturbation:
    """Where each new hidden value is produced in the step: adding a zero perturbation there and
    differentiating the loss by it gives the learning signal `∂L_t/∂h_t` in one VJP.

    **Fields:**

    - `hidden_paths`: key paths of the perturbed states.
    - `perturb_vars`: the jaxpr variables that hold their new values, in the same order.
    - `producers`: the name of the primitive producing each.
    - `chained`: whether some new hidden value is computed from another one within the step
      (an LSTM's `h` from its new `c`), not only through ETP operations.
    """

    hidden_paths: tuple[Path, ...]
    perturb_vars: tuple[Var, ...]
    producers: tuple[str, ...]
    chained: bool = False


@dataclasses.dataclass(frozen=True, eq=False)
class ETraceGraph:
    """The compiled structure of one step of a model, produced by [`eqtrace.compile_etrace_graph`][].

    **Fields:**

    - `module_info`: the traced step ([`eqtrace.ModuleInfo`][]).
    - `hidden_groups`: the [`eqtrace.HiddenGroup`][]s.
    - `hid_path_to_group`: hidden path → its group.
    - `hidden_param_op_relations`: the [`eqtrace.HiddenParamOpRelation`][]s.
    - `excluded_weights`: every trainable leaf in no relation, with its reason
      ([`eqtrace.ExcludedWeight`][]).
    - `hidden_perturb`: the [`eqtrace.HiddenPerturbation`][] (or `None` if no state is produced
      inside the step).
    - `partly_traced_weights`: weights in a relation that also reach a hidden state through a use
      the traces do not follow (e.g. `eqtrace.matmul(x, W) + x @ W`), each with its reason
      (`untraced_use`): that use is credited within the rules' exact window only.
    - `untraced_hidden_paths`: states that are not traced (integer states, or states the step passes
      through unchanged).
    - `frozen_weights`: inexact leaves left out of training by the `filter_spec` the graph was
      compiled with: in no relation, with no trace and no gradient (`None` in every rule's gradient).

    A graph holds a traced JAX program of the model's step, so it is recompiled, not saved: it
    cannot be pickled, and `eqx.tree_serialise_leaves` writes nothing for it (it has no array
    leaves). Save the model, and call `eqtrace.compile_etrace_graph(model, x, state)` after loading
    it. Copies (`copy.copy`, `copy.deepcopy`) are the graph itself, which is immutable.
    """

    module_info: ModuleInfo
    hidden_groups: tuple[HiddenGroup, ...]
    hid_path_to_group: Mapping[Path, HiddenGroup]
    hidden_param_op_relations: tuple[HiddenParamOpRelation, ...]
    excluded_weights: tuple[ExcludedWeight, ...]
    hidden_perturb: HiddenPerturbation | None
    partly_traced_weights: tuple[ExcludedWeight, ...] = ()
    untraced_hidden_paths: tuple[Path, ...] = ()
    frozen_weights: tuple[Path, ...] = ()

    def __reduce__(self):
        raise TypeError(
            "An `ETraceGraph` cannot be pickled: it holds a traced JAX program of the model's step. "
            "Graphs are recompiled, not saved: save the model (e.g. with `eqx.tree_serialise_leaves`) "
            "and, after loading it, recompile with `eqtrace.compile_etrace_graph(model, x, state)`."
        )

    def __copy__(self) -> "ETraceGraph":
        return self

    def __deepcopy__(self, memo) -> "ETraceGraph":
        return self

    def dict(self) -> dict:
        """The fields as a dictionary (as `NamedTuple._asdict` would give)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __str__(self) -> str:
        from ._show import format_graph

        return format_graph(self)

    def to_mermaid(self) -> str:
        """A Mermaid flowchart: weights → ETP operations → hidden groups."""
        from ._show import graph_to_mermaid

        return graph_to_mermaid(self)

    def to_dot(self) -> str:
        """The same picture as a Graphviz DOT digraph."""
        from ._show import graph_to_dot

        return graph_to_dot(self)

    # Rich display in Jupyter and IPython. Each front end shows the richest view it can render:
    # JupyterLab draws the Mermaid flowchart, others the SVG where Graphviz is installed, and a
    # terminal the text of `show_graph`.

    def _repr_markdown_(self) -> str:
        return f"```mermaid\n{self.to_mermaid()}\n```\n"

    def _repr_svg_(self) -> str | None:
        dot = shutil.which("dot")
        if dot is None:
            return None  # no SVG view: the front end falls back to another
        try:
            result = subprocess.run(
                [dot, "-Tsvg"], input=self.to_dot(), capture_output=True, text=True, timeout=60
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout if result.returncode == 0 and "<svg" in result.stdout else None

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        printer.text(str(self))
