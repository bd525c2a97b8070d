"""optimum-oats: sparse + low-rank compression of Hugging Face models.

Importing the package registers the `"oats"` quantization method with transformers, so
`from_pretrained(..., quantization_config=OATSConfig(...))` (or `oats_config=`) compresses on load and
compressed checkpoints reload. The few patches of transformers' methods are listed, with their opt-out
(`OATS_NO_PATCH`), in `optimum_oats/integrations/patches.py`.
"""

from .compress import compress, compression_report
from .config import OATSConfig
from .engine.report import CompressionReport
from .hub import publish
from .hub.autocard import install as _install_model_card
from .integrations.default_model import default_model_path
from .integrations.patches import apply_patches as _apply_patches
from .integrations.transformers import register as _register
from .nn import LinearSparseLowRank
from .utils.version import __version__

_register()
_apply_patches()  # every patch of transformers, less those `OATS_NO_PATCH` names (integrations/patches.py)
_install_model_card()

__all__ = [
    "CompressionReport",
    "LinearSparseLowRank",
    "OATSConfig",
    "__version__",
    "compress",
    "compression_report",
    "default_model_path",
    "publish",
]
