"""lionkit for MLX: ``Lion`` (drop-in for ``mlx.optimizers.Lion``, fp32 math for every parameter
dtype) and ``Lion8bit`` (momentum as uint8 codes + one fp32 scale per block of 256 elements, the
format and codes of lionkit's PyTorch ``Lion8bit``; convert states with ``lionkit.interop``).

Needs ``pip install 'lionkit[mlx]'`` (on Linux that installs ``mlx[cpu]``).
"""

try:
    import mlx.core as _mx  # noqa: F401
    import mlx.optimizers as _optimizers  # noqa: F401
except ImportError as _e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"lionkit.mlx needs MLX ({_e}); install it with: pip install 'lionkit[mlx]' "
        "(on Linux this is mlx[cpu]; plain mlx alone does not import there)"
    ) from _e

from .optimizers import Lion, Lion8bit

__all__ = ["Lion", "Lion8bit"]
