"""spark3d: sparse masked modeling (SparK) for 2D and 3D convnets, with MONAI fine-tuning."""

from .encoders import HierarchicalEncoder, from_monai, from_timm
from .methods import SparK, SparKOutput
from .version import __version__

__all__ = ["SparK", "SparKOutput", "HierarchicalEncoder", "from_timm", "from_monai", "__version__"]
