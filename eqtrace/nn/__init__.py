from ._conv import AbstractConv as AbstractConv, Conv1d as Conv1d, Conv2d as Conv2d
from ._linear import Linear as Linear
from ._rnn_cells import (
    AbstractRNNCell as AbstractRNNCell,
    GRUCell as GRUCell,
    GRUState as GRUState,
    IndRNNCell as IndRNNCell,
    IndRNNState as IndRNNState,
    LSTMCell as LSTMCell,
    LSTMState as LSTMState,
    MGUCell as MGUCell,
    MGUState as MGUState,
    MinimalRNNCell as MinimalRNNCell,
    MinimalRNNState as MinimalRNNState,
    ValinaRNNCell as ValinaRNNCell,
    VanillaRNNCell as VanillaRNNCell,
    VanillaRNNState as VanillaRNNState,
)
