"""spark3d: sparse masked modeling (SparK, ConvMAE) for 2D and 3D networks, with MONAI fine-tuning."""

from .encoders import HierarchicalEncoder, from_monai, from_timm
from .methods import ConvMAE, SparK, SparKOutput
from .version import __version__

__all__ = ["SparK", "SparKOutput", "ConvMAE", "HierarchicalEncoder", "from_timm", "from_monai", "__version__"]
