"""Building blocks: activated batch norm, residual blocks, the DeepLabV3 head."""

from .deeplab import ASPP_RATES, DeeplabV3
from .misc import (
    ABN,
    ACTIVATIONS,
    BatchNormAct2d,
    InPlaceABN,
    InPlaceABNSync,
    abs_plus_eps,
    apply_activation,
    import_inplace_abn,
    is_norm_layer,
)
from .residual import ResidualBlock, identity_norm

__all__ = [
    "ABN",
    "ACTIVATIONS",
    "ASPP_RATES",
    "BatchNormAct2d",
    "DeeplabV3",
    "InPlaceABN",
    "InPlaceABNSync",
    "ResidualBlock",
    "abs_plus_eps",
    "apply_activation",
    "identity_norm",
    "import_inplace_abn",
    "is_norm_layer",
]
