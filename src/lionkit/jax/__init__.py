"""lionkit for JAX: Lion as optax gradient transformations, with 32- or 8-bit momentum.

``lion(...)`` is the ready optimizer (clipping, Lion direction, decoupled weight decay, scheduled
learning rate, in braintools' order); ``scale_by_lion(...)`` is the building block. With
``state_bits=8`` the momentum is stored as uint8 codes plus one fp32 scale per block of 256
elements, in exactly the format (and with exactly the codes) of lionkit's PyTorch ``Lion8bit``,
so states move between frameworks with ``lionkit.interop``. ``lionkit.jax.braintools`` plugs the
same transform into braintools' optimizer classes.

Needs ``pip install 'lionkit[jax]'`` (jax and optax).
"""

try:
    import jax as _jax  # noqa: F401
    import optax as _optax  # noqa: F401
except ImportError as _e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"lionkit.jax needs jax and optax ({_e}); install them with: pip install 'lionkit[jax]'"
    ) from _e

from .alias import add_decayed_weights, clip_by_global_norm, lion, promote_to_float32
from .transform import ScaleByLion8bitState, ScaleByLionState, scale_by_lion

__all__ = [
    "lion",
    "scale_by_lion",
    "add_decayed_weights",
    "clip_by_global_norm",
    "promote_to_float32",
    "ScaleByLionState",
    "ScaleByLion8bitState",
]
