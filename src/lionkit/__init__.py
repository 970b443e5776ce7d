"""lionkit: the Lion optimizer done properly.

PyTorch optimizers compatible with bitsandbytes' Lion family (32- and 8-bit momentum,
block-wise quantization, percentile clipping, paged state, per-parameter overrides), plus
learning-rate schedules and gradient clipping from MLX and braintools.
"""

from .checkpoint import save_checkpoint
from .config import GlobalOptimManager
from .lion import Lion, Lion8bit, Lion32bit, PagedLion, PagedLion8bit, PagedLion32bit
from .qstate import QuantizedState

__version__ = "0.1.0"

__all__ = [
    "Lion",
    "Lion8bit",
    "Lion32bit",
    "PagedLion",
    "PagedLion8bit",
    "PagedLion32bit",
    "GlobalOptimManager",
    "QuantizedState",
    "save_checkpoint",
    "__version__",
]
