"""Building blocks: activated batch norm, residual blocks, the DeepLabV3 head, DGCNN's point layers."""

from .abn import (
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
from .deeplab import ASPP_RATES, DeeplabV3
from .edgeconv import EdgeConv, PointSegHead, edge_features, knn
from .residual import ResidualBlock, identity_norm

__all__ = [
    "ABN",
    "ACTIVATIONS",
    "ASPP_RATES",
    "BatchNormAct2d",
    "DeeplabV3",
    "EdgeConv",
    "InPlaceABN",
    "InPlaceABNSync",
    "PointSegHead",
    "ResidualBlock",
    "abs_plus_eps",
    "apply_activation",
    "edge_features",
    "identity_norm",
    "import_inplace_abn",
    "is_norm_layer",
    "knn",
]
