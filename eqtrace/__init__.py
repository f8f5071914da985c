from . import nn as nn
from ._algorithms import (
    AbstractOnlineAlgorithm as AbstractOnlineAlgorithm,
    batch_grad as batch_grad,
    bptt_grad as bptt_grad,
    d_rtrl_init as d_rtrl_init,
    d_rtrl_step as d_rtrl_step,
    DRTRL as DRTRL,
    DRTRLTraces as DRTRLTraces,
    EProp as EProp,
    EPropTraces as EPropTraces,
    es_d_rtrl_init as es_d_rtrl_init,
    es_d_rtrl_step as es_d_rtrl_step,
    ESDRTRL as ESDRTRL,
    ESDRTRLTraces as ESDRTRLTraces,
    online_grad as online_grad,
    RTRL as RTRL,
    SnAp1 as SnAp1,
    TruncatedBPTT as TruncatedBPTT,
    UORO as UORO,
    UOROTraces as UOROTraces,
    WindowBuffer as WindowBuffer,
)
from ._check import (
    check_gradient as check_gradient,
    GradientCheck as GradientCheck,
    GradientCheckRow as GradientCheckRow,
)
from ._compiler import (
    compile_etrace_graph as compile_etrace_graph,
    ETraceGraph as ETraceGraph,
    ExcludedWeight as ExcludedWeight,
    HiddenGroup as HiddenGroup,
    HiddenParamOpRelation as HiddenParamOpRelation,
    HiddenPerturbation as HiddenPerturbation,
    ModuleInfo as ModuleInfo,
    show_graph as show_graph,
)
from ._front import (
    CompiledAlgorithm as CompiledAlgorithm,
    D_RTRL as D_RTRL,
    ES_D_RTRL as ES_D_RTRL,
    pp_prop as pp_prop,
)
from ._ops import (
    conv as conv,
    element_wise as element_wise,
    etp_conv_p as etp_conv_p,
    etp_element_wise_p as etp_element_wise_p,
    etp_matmul_p as etp_matmul_p,
    matmul as matmul,
)
