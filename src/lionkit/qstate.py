"""The 8- or 4-bit momentum as a self-describing object: codes, per-block absmax, map, block
size, bits.

Optimizer state dicts keep the parts as plain tensors (bitsandbytes' keys ``state1``,
``absmax1``, ``qmap1``); ``QuantizedState`` is a view over them for kernels and users.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import quant, quant4


@dataclass
class QuantizedState:
    """Quantized tensor: ``value = qmap[code] * absmax[block]``.

    8 bits (``bits=8``): ``codes`` is shaped like the tensor, ``qmap`` has 256 levels,
    ``block_size`` is 256 or None (one scale for the whole tensor, ``block_wise=False``).
    4 bits (``bits=4``, ``lionkit.quant4``): ``codes`` holds two codes per byte, flat,
    ``qmap`` has 15 levels, ``block_size`` is 32, and ``numel`` says how many elements there are.
    The tensors are shared, not copied: kernels update ``codes`` and ``absmax`` in place.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    qmap: torch.Tensor
    block_size: int | None = quant.BLOCK_SIZE
    bits: int = 8
    numel: int | None = None  # elements (4-bit: the codes are packed); None = codes.numel()

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

    @classmethod
    def zeros4(cls, numel: int, device: torch.device | str, qmap: torch.Tensor | None = None) -> "QuantizedState":
        """The all-zero 4-bit state of ``numel`` elements."""
        codes, absmax = quant4.zero_state(numel, device)
        qmap = quant4.normal_map(device) if qmap is None else qmap
        return cls(codes, absmax, qmap, quant4.BLOCK_SIZE, 4, numel)

    @classmethod
    def from_float4(cls, x: torch.Tensor, qmap: torch.Tensor | None = None) -> "QuantizedState":
        """Quantize a float tensor to 4 bits, rounding to nearest (for converting a state; the
        optimizer's steps round stochastically)."""
        qmap = quant4.normal_map(x.device) if qmap is None else qmap
        codes, absmax = quant4.quantize(x, qmap)
        return cls(codes, absmax, qmap, quant4.BLOCK_SIZE, 4, x.numel())

    def dequantize(self) -> torch.Tensor:
        """The fp32 values this state stands for (flat for 4 bits, shaped like codes for 8)."""
        if self.bits == 4:
            return quant4.dequantize(self.codes, self.absmax, self.qmap, self.size())
        return quant.dequantize(self.codes, self.absmax, self.qmap, self.block_size)

    def size(self) -> int:
        """Number of elements."""
        return self.codes.numel() if self.numel is None else self.numel

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape if self.bits == 8 else torch.Size([self.size()])

    def nbytes(self) -> int:
        """Bytes held per tensor (codes + scales; the shared map is not counted)."""
        return self.codes.numel() + 4 * self.absmax.numel()

    def __repr__(self) -> str:
        blocks = "per-tensor" if self.block_size is None else f"block_size={self.block_size}"
        return (
            f"QuantizedState({self.bits}-bit, shape={tuple(self.shape)}, {blocks}, scales={self.absmax.numel()}, "
            f"device={self.codes.device})"
        )
