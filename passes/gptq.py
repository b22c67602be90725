"""GPTQ rounding for weight-only quantization, in numpy. Not a pass: `quantize-weights` calls it.

GPTQ (Frantar et al., 2022) quantizes a weight one input row at a time and pushes each row's rounding
error onto the rows not yet quantized, weighted by the inverse Hessian of the layer's squared output
error, H = 2 X^T X over calibration inputs X. Rows whose input is correlated with others then absorb
each other's error, so ||X W - X W_q|| ends lower than with round-to-nearest.

Conventions: the weight is W [K, N] as a MatMul reads it (K input rows, N output columns); quantization
blocks run along K, so a block's scale (and zero point) is computed from the error-updated rows when
the block starts (asymmetric: as `passes.qdq.quantize_blockwise` computes it for those rows; symmetric:
max|w| / (2^(bits-1) - 1), see `_block_params`). The result is a `QuantizedWeight` in the layout
`quantize_blockwise` / `quantize_per_channel` return; with an uncorrelated X (H diagonal) asymmetric
GPTQ and round-to-nearest give the same integers.
"""

from __future__ import annotations

import numpy as np

from graphopt.passes.qdq import QuantizedWeight, quantize_blockwise, quantize_per_channel

DAMPING = 0.01  # added to H's diagonal, as a share of its mean diagonal
LAZY_ROWS = 128  # rows updated together before the error is pushed onto the rest in one product


class Hessian:
    """Streams H = 2 X^T X for one MatMul input: `add` each activation batch ([..., K]), nothing kept."""

    def __init__(self, k: int):
        self.matrix = np.zeros((k, k), np.float64)
        self.rows = 0

    def add(self, x: np.ndarray) -> None:
        flat = np.asarray(x, np.float64).reshape(-1, self.matrix.shape[0])
        self.matrix += 2.0 * flat.T @ flat
        self.rows += flat.shape[0]


def gptq(w: np.ndarray, hessian: np.ndarray, bits: int = 4, block_size: int = 32, symmetric: bool = True) -> QuantizedWeight:
    """Quantize W [K, N] with error feedback through `hessian` [K, K]; block_size 0 means one scale per
    output column (symmetric only, as `quantize_per_channel`)."""
    k, n = w.shape
    weights = np.asarray(w, np.float64).copy()
    h = np.asarray(hessian, np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    weights[dead, :] = 0.0
    h[np.diag_indices(k)] += DAMPING * float(np.mean(np.diag(h)))
    upper = _inverse_cholesky_upper(h)

    values = np.zeros((k, n), np.int16)
    if block_size:
        blocks = -(-k // block_size)
        scale = np.zeros((blocks, n), np.float32)
        zero = None if symmetric else np.zeros((blocks, n), np.uint8)
    else:
        fixed = quantize_per_channel(weights.astype(np.float32), axis=1, bits=bits)
        scale = fixed.scale
    for start in range(0, k, LAZY_ROWS):
        stop = min(start + LAZY_ROWS, k)
        errors = np.zeros((stop - start, n), np.float64)
        for i in range(start, stop):
            if block_size and i % block_size == 0:
                scale[i // block_size], block_zero = _block_params(weights[i : i + block_size], bits, symmetric)
                if zero is not None:
                    zero[i // block_size] = block_zero
            row_scale = scale[i // block_size] if block_size else scale
            row_zero = zero[i // block_size] if block_size and zero is not None else None
            q = _round_row(weights[i], row_scale, row_zero, bits, symmetric, per_channel=not block_size)
            restored = (q - (0 if row_zero is None else row_zero.astype(np.float64))) * row_scale
            error = (weights[i] - restored) / upper[i, i]
            values[i] = q
            weights[i + 1 : stop] -= np.outer(upper[i, i + 1 : stop], error)
            errors[i - start] = error
        weights[stop:] -= upper[start:stop, stop:].T @ errors
    dtype = np.int8 if symmetric else np.uint8
    if not block_size:
        return QuantizedWeight(values.astype(np.int8), scale, 1, bits)
    return QuantizedWeight(values.astype(dtype), scale, 0, bits, block_size, zero)


def _block_params(rows: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale (and zero point) of one block of rows [block, N]. Asymmetric: as `quantize_blockwise`.
    Symmetric: max|w| maps to 2^(bits-1) - 1, not to -2^(bits-1) as in `quantize_blockwise`, whose
    positive extreme then clips by a full step; round-to-nearest loses little by that, but GPTQ pushes
    each clipped error onto the next rows, which clip in turn (measured on MiniLM: token cosine 0.35
    instead of 0.97)."""
    if not symmetric:
        block = quantize_blockwise(rows.astype(np.float32), 0, rows.shape[0], bits, symmetric=False)
        return block.scale[0], block.zero_point[0]
    amax = np.abs(rows).max(axis=0)
    return np.where(amax > 0, amax / (2 ** (bits - 1) - 1), 1.0).astype(np.float32), None


def _inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """Upper-triangular U with U^T U = H^-1 (the factor GPTQ's error feedback reads row by row)."""
    inverse = np.linalg.inv(h)
    inverse = (inverse + inverse.T) / 2.0
    return np.linalg.cholesky(inverse).T


def _round_row(row: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int, symmetric: bool, per_channel: bool) -> np.ndarray:
    """Integers for one row at fixed scales, with the ranges `quantize_blockwise` / `quantize_per_channel` use."""
    if per_channel:
        qmax = 2 ** (bits - 1) - 1
        return np.clip(np.rint(row / scale), -qmax, qmax)
    if symmetric:
        return np.clip(np.rint(row / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return np.clip(np.rint(row / scale) + zero, 0, 2**bits - 1)
