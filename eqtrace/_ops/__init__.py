from ._conv import conv as conv, etp_conv_p as etp_conv_p
from ._element_wise import element_wise as element_wise, etp_element_wise_p as etp_element_wise_p
from ._matmul import etp_matmul_p as etp_matmul_p, matmul as matmul
from ._registry import etp_op_of as etp_op_of, EtpOp as EtpOp
