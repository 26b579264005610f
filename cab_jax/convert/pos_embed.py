"""Resampling a learned ViT position embedding to another patch grid (other image size or patch count)."""

from __future__ import annotations

import math

import jax
import numpy as np


def grid_size(num_patches: int, what: str = "position embedding") -> int:
    """Side of the square patch grid holding ``num_patches`` patches."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{what}: {num_patches} patch positions do not form a square grid")
    return side


def resize_pos_embed(pos_embed: np.ndarray, new_grid: int, n_prefix: int = 1) -> np.ndarray:
    """``pos_embed`` (1, n_prefix + g * g, d) resampled to (1, n_prefix + new_grid ** 2, d).

    The patch rows are treated as a (g, g, d) image in row-major order and resized bicubically
    (``jax.image.resize(method="cubic")``: Keys' kernel with a = -0.5, half-pixel centres, antialiased when
    shrinking); the ``n_prefix`` leading rows (cls / distillation tokens) are kept unchanged. When the grid
    already matches, the values come back unchanged (a float32 copy).
    """
    pos_embed = np.asarray(pos_embed, np.float32)
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[1] < n_prefix:
        raise ValueError(f"expected a position embedding (1, {n_prefix} + grid * grid, dim), got {pos_embed.shape}")
    if new_grid < 1:
        raise ValueError(f"new_grid must be positive, got {new_grid}")
    prefix, patches = pos_embed[:, :n_prefix], pos_embed[0, n_prefix:]
    old_grid = grid_size(patches.shape[0])
    if old_grid == new_grid:
        return pos_embed.copy()
    dim = patches.shape[-1]
    image = patches.reshape(old_grid, old_grid, dim)
    with jax.default_matmul_precision("highest"):  # the resize is a pair of matmuls: no TF32 / bf16 passes
        resized = jax.image.resize(image, (new_grid, new_grid, dim), method="cubic")
    resized = np.asarray(resized, np.float32).reshape(1, new_grid * new_grid, dim)
    return np.concatenate([prefix, resized], axis=1)
