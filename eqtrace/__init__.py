from ._ops import (
    conv as conv,
    element_wise as element_wise,
    etp_conv_p as etp_conv_p,
    etp_element_wise_p as etp_element_wise_p,
    etp_matmul_p as etp_matmul_p,
    matmul as matmul,
)
