from ._conv import AbstractConv as AbstractConv, Conv1d as Conv1d, Conv2d as Conv2d, Conv3d as Conv3d
from ._embedding import Embedding as Embedding
from ._grouped import GroupedLinear as GroupedLinear
from ._linear import Linear as Linear
from ._lora import lora_adapters_only as lora_adapters_only, LoRALinear as LoRALinear
from ._lru import LRU as LRU, LRUState as LRUState
from ._minimal_cells import MiniGRUCell as MiniGRUCell, MiniLSTMCell as MiniLSTMCell
from ._neurons import (
    AbstractNeuron as AbstractNeuron,
    ALIF as ALIF,
    ALIFState as ALIFState,
    LIF as LIF,
    LIFState as LIFState,
)
from ._readouts import LeakyRateReadout as LeakyRateReadout, LeakyRateReadoutState as LeakyRateReadoutState
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
from ._sparse import SparseLinear as SparseLinear
from ._spiking_layers import (
    AbstractSpikingLayer as AbstractSpikingLayer,
    FeedForwardSpikingLayer as FeedForwardSpikingLayer,
    RecurrentSpikingLayer as RecurrentSpikingLayer,
)
from ._surrogates import (
    AbstractSurrogate as AbstractSurrogate,
    ArctanSurrogate as ArctanSurrogate,
    SigmoidSurrogate as SigmoidSurrogate,
    TriangleSurrogate as TriangleSurrogate,
)
from ._synapses import ExpSynapse as ExpSynapse, ExpSynapseState as ExpSynapseState
