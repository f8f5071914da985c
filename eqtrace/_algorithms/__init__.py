from ._bptt import bptt_grad as bptt_grad
from ._d_rtrl import (
    d_rtrl_init as d_rtrl_init,
    d_rtrl_step as d_rtrl_step,
    DRTRL as DRTRL,
    DRTRLTraces as DRTRLTraces,
)
from ._drivers import batch_grad as batch_grad, graph_for as graph_for, online_grad as online_grad
from ._eprop import EProp as EProp, EPropTraces as EPropTraces
from ._es_d_rtrl import (
    es_d_rtrl_init as es_d_rtrl_init,
    es_d_rtrl_step as es_d_rtrl_step,
    ESDRTRL as ESDRTRL,
    ESDRTRLTraces as ESDRTRLTraces,
)
from ._ostl import OSTL as OSTL, OSTLTraces as OSTLTraces
from ._otpe import OTPE as OTPE, OTPETraces as OTPETraces
from ._ottt import OTTT as OTTT, OTTTTraces as OTTTTraces
from ._rflo import RFLO as RFLO
from ._rtrl import RTRL as RTRL
from ._rule import (
    AbstractDeferringAlgorithm as AbstractDeferringAlgorithm,
    AbstractOnlineAlgorithm as AbstractOnlineAlgorithm,
    GradFactors as GradFactors,
)
from ._snap import SnAp1 as SnAp1
from ._streaming import Stream as Stream, StreamState as StreamState
from ._truncated_bptt import TruncatedBPTT as TruncatedBPTT
from ._uoro import UORO as UORO, UOROTraces as UOROTraces
from ._window import WindowBuffer as WindowBuffer
