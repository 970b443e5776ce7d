"""The 8-bit momentum as a self-describing object: codes, per-block absmax, map, block size.

Optimizer state dicts keep the parts as plain tensors (bitsandbytes' keys ``state1``,
``absmax1``, ``qmap1``); ``QuantizedState`` is a view over them for kernels and users.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import quant


@dataclass
class QuantizedState:
    """8-bit tensor: ``value = qmap[codes] * absmax[block]``.

    ``block_size=None`` means one scale for the whole tensor (``block_wise=False``).
    The tensors are shared, not copied: kernels update ``codes`` and ``absmax`` in place.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    qmap: torch.Tensor
    block_size: int | None = quant.BLOCK_SIZE

    @classmethod
    def zeros(
        cls, like: torch.Tensor, block_size: int | None = quant.BLOCK_SIZE, qmap: torch.Tensor | None = None
    ) -> "QuantizedState":
        """The all-zero state for a tensor shaped like ``like``."""
        qmap = quant.dynamic_map(like.device) if qmap is None else qmap
        _, zero = quant.code_thresholds(qmap)
        codes = torch.full(like.shape, zero, dtype=torch.uint8, device=like.device)
        absmax = torch.zeros(quant.num_blocks(like.numel(), block_size), dtype=torch.float32, device=like.device)
        return cls(codes, absmax, qmap, block_size)

    @classmethod
    def from_float(
        cls, x: torch.Tensor, block_size: int | None = quant.BLOCK_SIZE, qmap: torch.Tensor | None = None
    ) -> "QuantizedState":
        """Quantize a float tensor."""
        qmap = quant.dynamic_map(x.device) if qmap is None else qmap
        codes, absmax = quant.quantize(x, qmap, block_size)
        return cls(codes, absmax, qmap, block_size)

    def dequantize(self) -> torch.Tensor:
        """The fp32 tensor this state stands for."""
        return quant.dequantize(self.codes, self.absmax, self.qmap, self.block_size)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def nbytes(self) -> int:
        """Bytes held per tensor (codes + scales; the shared 1 KiB map is not counted)."""
        return self.codes.numel() + 4 * self.absmax.numel()

    def __repr__(self) -> str:
        blocks = "per-tensor" if self.block_size is None else f"block_size={self.block_size}"
        return (
            f"QuantizedState(shape={tuple(self.codes.shape)}, {blocks}, scales={self.absmax.numel()}, "
            f"device={self.codes.device})"
        )
