"""Former name of :mod:`modules.abn` (activated batch norm): ``from modules.misc import ...`` keeps working.

New code imports from :mod:`modules.abn` or from :mod:`modules`.
"""

from .abn import (
    ABN,
    ACTIVATIONS,
    BatchNormAct2d,
    InPlaceABN,
    InPlaceABNSync,
    abs_plus_eps,
    all_reduce_sum_differentiable,
    apply_activation,
    check_activation,
    import_inplace_abn,
    is_norm_layer,
)

__all__ = [
    "ABN",
    "ACTIVATIONS",
    "BatchNormAct2d",
    "InPlaceABN",
    "InPlaceABNSync",
    "abs_plus_eps",
    "all_reduce_sum_differentiable",
    "apply_activation",
    "check_activation",
    "import_inplace_abn",
    "is_norm_layer",
]
