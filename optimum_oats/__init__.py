"""optimum-oats: sparse + low-rank compression of Hugging Face models.

Importing the package registers the `"oats"` quantization method with transformers, so
`from_pretrained(..., quantization_config=OATSConfig(...))` (or `oats_config=`) compresses on load and
compressed checkpoints reload.
"""

from .compress import compress, compression_report
from .config import OATSConfig
from .hub import publish
from .integration import register as _register
from .nn import LinearSparseLowRank
from .report import CompressionReport

__version__ = "0.1.0"

_register()

__all__ = ["CompressionReport", "LinearSparseLowRank", "OATSConfig", "compress", "compression_report", "publish"]
