from ._conv import conv as conv, etp_conv_p as etp_conv_p
from ._einsum import einsum as einsum, etp_einsum_p as etp_einsum_p
from ._element_wise import element_wise as element_wise, etp_element_wise_p as etp_element_wise_p
from ._embedding import embedding as embedding, etp_embedding_p as etp_embedding_p
from ._lora import etp_lora_matmul_p as etp_lora_matmul_p, lora_matmul as lora_matmul
from ._matmul import etp_matmul_p as etp_matmul_p, matmul as matmul
from ._registry import (
    etp_op as etp_op,
    etp_op_of as etp_op_of,
    EtpOp as EtpOp,
    register_etp_op as register_etp_op,
)
from ._sparse import (
    etp_sparse_matmul_p as etp_sparse_matmul_p,
    sparse_matmul as sparse_matmul,
    SparsePattern as SparsePattern,
)
