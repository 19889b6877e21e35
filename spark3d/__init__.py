"""spark3d: sparse masked modeling (SparK) for 2D and 3D convnets, with MONAI fine-tuning."""

from .spark import SparK, SparKOutput

__version__ = "0.1.0"
__all__ = ["SparK", "SparKOutput", "__version__"]
