"""spark3d: sparse masked modeling (SparK) for 2D and 3D convnets, with MONAI fine-tuning."""

__version__ = "0.1.0"

from .encoders import HierarchicalEncoder, from_monai, from_timm  # noqa: E402
from .methods import ConvMAE, SparK, SparKOutput  # noqa: E402

__all__ = ["SparK", "SparKOutput", "ConvMAE", "HierarchicalEncoder", "from_timm", "from_monai", "__version__"]
