"""lionkit: the Lion optimizer done properly.

PyTorch optimizers compatible with bitsandbytes' Lion family (32- and 8-bit momentum,
block-wise quantization, percentile clipping, paged state, per-parameter overrides), plus
learning-rate schedules and gradient clipping from MLX and braintools.
"""

try:
    from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, to_bitsandbytes
    from .guards import NonFiniteGradientError
    from .config import GlobalOptimManager
    from .lion import Lion, Lion4bit, Lion8bit, Lion32bit, PagedLion, PagedLion8bit, PagedLion32bit
    from .qstate import QuantizedState
except ModuleNotFoundError as _e:
    # Without torch (e.g. a Python 3.12 braintools environment, where torch would pull
    # gigabytes of CUDA wheels), lionkit.jax, lionkit.mlx and lionkit.interop still work;
    # the PyTorch names raise ImportError when used.
    if _e.name != "torch":
        raise
    _torch_error = _e

    def __getattr__(name: str):
        if name in __all__:
            raise ImportError(f"lionkit.{name} needs PyTorch ({_torch_error}): pip install torch") from _torch_error
        raise AttributeError(f"module 'lionkit' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "Lion",
    "Lion4bit",
    "Lion8bit",
    "Lion32bit",
    "PagedLion",
    "PagedLion8bit",
    "PagedLion32bit",
    "GlobalOptimManager",
    "QuantizedState",
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointError",
    "to_bitsandbytes",
    "NonFiniteGradientError",
    "__version__",
]
