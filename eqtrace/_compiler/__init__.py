from ._compile import compile_etrace_graph as compile_etrace_graph, key_to_path as key_to_path
from ._evaluate import evaluate as evaluate
from ._graph import (
    ETraceGraph as ETraceGraph,
    ExcludedWeight as ExcludedWeight,
    EXCLUSION_REASONS as EXCLUSION_REASONS,
    HiddenGroup as HiddenGroup,
    HiddenParamOpRelation as HiddenParamOpRelation,
    HiddenPerturbation as HiddenPerturbation,
    ModuleInfo as ModuleInfo,
    Path as Path,
)
from ._run import run_step as run_step
from ._show import show_graph as show_graph
