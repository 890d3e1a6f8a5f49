"""Image masks over a grid of N patches: MAE's per-sample random shuffle (keep K, drop the rest)
and BEiT's blockwise masks — rectangles until exactly `num_masked` patches (`beit_block_mask`), or
the released sampler, which may stop short (`beit_unilm_mask`). Row b uses fold_in(key, b)."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from maskjax.masking._rows import _row_bits, _row_keys, _unit


class MaeMask(NamedTuple):
    """MAE shuffle. ids_keep (B, K) visible patch indices; mask (B, N) float32, 1 = removed, 0 = kept;
    ids_restore (B, N) the inverse permutation that unshuffles [kept; removed] back to patch order."""

    ids_keep: jax.Array
    mask: jax.Array
    ids_restore: jax.Array


class BeitBlocks(NamedTuple):
    """BEiT mask with the blocks that made it. mask (B, N) bool; blocks (B, A, 4) int32 rows
    (top, left, height, width); accepted (B, A) bool; fallback (B, N) bool patches added outside any
    block (see :func:`beit_block_mask_with_blocks`)."""

    mask: jax.Array
    blocks: jax.Array
    accepted: jax.Array
    fallback: jax.Array


# ---------------------------------------------------------------------------------------------
# MAE


def mae_num_keep(num_patches: int, mask_ratio: float) -> int:
    """K = int(N * (1 - mask_ratio)), truncating, as MAE's random_masking (models_mae.py) and HF's
    ViTMAEEmbeddings.random_masking compute len_keep. N=196, ratio 0.75 -> 49 (MAE Sec. 3, 75%)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    k = int(num_patches * (1 - mask_ratio))
    if k < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps no patch of {num_patches}")
    return k


def mae_mask_from_noise(noise: jax.Array, mask_ratio: float) -> MaeMask:
    """MAE per-sample shuffle (He et al. 2022, Sec. 3 "Masking"; models_mae.py random_masking).

    noise (B, N): argsort ascending (small = keep), keep the first K = mae_num_keep(N, ratio),
    ids_restore = argsort(ids_shuffle). mask[i] = 1 iff patch i is removed; the reference builds
    [0]*K + [1]*(N-K) and gathers it with ids_restore, i.e. mask[i] = (ids_restore[i] >= K).
    """
    B, N = noise.shape
    K = mae_num_keep(N, mask_ratio)
    ids_shuffle = jnp.argsort(noise, axis=1, stable=True).astype(jnp.int32)
    ids_restore = jnp.argsort(ids_shuffle, axis=1, stable=True).astype(jnp.int32)
    mask = (ids_restore >= K).astype(jnp.float32)
    return MaeMask(ids_shuffle[:, :K], mask, ids_restore)


def mae_random_mask(key: jax.Array, batch: int, num_patches: int, mask_ratio: float) -> MaeMask:
    """:func:`mae_mask_from_noise` on uniform noise, one key per row."""
    noise = _unit(_row_bits(key, batch, num_patches))
    return mae_mask_from_noise(noise, mask_ratio)


# ---------------------------------------------------------------------------------------------
# BEiT


@lru_cache(maxsize=64)
def _beit_legal(grid: tuple[int, int], min_block: int, aspect: tuple[float, float]) -> np.ndarray:
    """legal[h, w]: the integer block obeys the rules exactly (1e-9 slack for float64 ratios)."""
    H, W = grid
    lo, hi = aspect
    h = np.arange(H + 1)[:, None]
    w = np.arange(W + 1)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        r = h / w
    fits = (h >= 1) & (w >= 1) & (h < H) & (w < W)
    return fits & (h * w >= min_block) & (r >= lo - 1e-9) & (r <= hi + 1e-9)


def beit_block_mask_with_blocks(
    key: jax.Array,
    batch: int,
    grid: tuple[int, int] = (14, 14),
    num_masked: int = 75,
    min_block: int = 16,
    max_block: int | None = None,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    max_attempts: int = 2048,
    proposals_per_step: int = 64,
) -> BeitBlocks:
    """BEiT blockwise masking (Bao et al. 2022, Sec. 2.3 and Algorithm 1), with the blocks placed.

    Algorithm 1 repeats: block area s ~ U[16, budget left], aspect r in [0.3, 1/0.3], a = sqrt(s r),
    b = sqrt(s / r), random top-left, add the block; BEiT masks 75 patches of 14x14 (the reference's
    --num_mask_patches 75, about 40%). As in the reference (unilm beit/masking_generator.py): r is
    log-uniform, h = round(sqrt(s r)), w = round(sqrt(s / r)), h < H and w < W, top/left uniform,
    and a block is accepted only if it adds between 1 and min(budget left, max_block) new patches.

    Our rules, applied to every accepted block (these are what the tests check): the integer
    rectangle has h * w >= min_block and aspect[0] <= h / w <= aspect[1] exactly (proposals whose
    rounding breaks this are rejected instead of kept), h < H, w < W. When the budget left is below
    min_block, s = min_block (the block must then overlap the mask to add few new patches).

    Exact count: the reference gives up after 10 failed proposals and can return fewer patches.
    We keep proposing (up to max_attempts, `proposals_per_step` at a time; the first acceptable
    one in each step is taken, the same law as proposing one at a time). Sometimes no legal block
    can add the last 1-3 patches at all. Then, and only then, the fallback masks the missing
    patches among the unmasked ones that touch the mask (4-neighbours), chosen at random, else any
    unmasked patch; they are reported in `fallback` (on 14x14/75/16, ~3% of images, ~1.4 patches).
    """
    H, W = grid
    N = H * W
    max_block = num_masked if max_block is None else max_block
    if not (1 <= num_masked <= N and 1 <= min_block <= max(min_block, num_masked)):
        raise ValueError(f"need 1 <= num_masked <= {N}, got num_masked={num_masked}, min_block={min_block}")
    legal_np = _beit_legal((H, W), int(min_block), (float(aspect[0]), float(aspect[1])))
    if not legal_np.any():
        raise ValueError(f"no block of area >= {min_block} and aspect in {aspect} fits a {H}x{W} grid")
    legal = jnp.asarray(legal_np)
    steps = max(1, math.ceil(max_attempts / proposals_per_step))
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    rows = jnp.arange(H)[:, None]
    cols = jnp.arange(W)[None, :]
    M = proposals_per_step

    def row(k):
        def step(carry, i):
            mask, count = carry
            u = _unit(jax.random.bits(jax.random.fold_in(k, i), (4, M), jnp.uint32))
            rem = num_masked - count
            cap = jnp.minimum(rem, max_block)
            s = min_block + u[0] * (jnp.maximum(min_block, cap) - min_block)
            r = jnp.exp(log_lo + u[1] * (log_hi - log_lo))
            h = jnp.round(jnp.sqrt(s * r)).astype(jnp.int32)
            w = jnp.round(jnp.sqrt(s / r)).astype(jnp.int32)
            hc, wc = jnp.clip(h, 0, H), jnp.clip(w, 0, W)
            ok = legal[hc, wc]
            t = jnp.floor(u[2] * (H - hc + 1)).astype(jnp.int32)
            left = jnp.floor(u[3] * (W - wc + 1)).astype(jnp.int32)
            t, left = jnp.clip(t, 0, H - hc), jnp.clip(left, 0, W - wc)
            # Masked patches inside each proposal from the integral image S[i, j] = sum mask[:i, :j].
            S = jnp.pad(jnp.cumsum(jnp.cumsum(mask.astype(jnp.int32), 0), 1), ((1, 0), (1, 0)))
            inside = S[t + hc, left + wc] - S[t, left + wc] - S[t + hc, left] + S[t, left]
            new = hc * wc - inside
            ok = ok & (new > 0) & (new <= cap) & (rem > 0)
            i = jnp.argmax(ok)
            hit = ok[i]
            block = jnp.stack([t[i], left[i], hc[i], wc[i]])
            rect = (rows >= t[i]) & (rows < t[i] + hc[i]) & (cols >= left[i]) & (cols < left[i] + wc[i])
            mask = mask | (rect & hit)
            return (mask, count + jnp.where(hit, new[i], 0)), (block, hit)

        init = (jnp.zeros((H, W), bool), jnp.zeros((), jnp.int32))
        (mask, count), (blocks, accepted) = lax.scan(step, init, jnp.arange(steps, dtype=jnp.uint32))
        # Fallback for the rare rows no legal block can finish: the missing patches, preferring
        # unmasked patches next to the mask so the result stays block-shaped.
        rem = num_masked - count
        pad = jnp.pad(mask, 1)
        touch = pad[:-2, 1:-1] | pad[2:, 1:-1] | pad[1:-1, :-2] | pad[1:-1, 2:]
        u_fill = _unit(jax.random.bits(jax.random.fold_in(k, steps), (H, W), jnp.uint32))
        score = jnp.where(mask, -1.0, u_fill + touch.astype(jnp.float32))
        rank = jnp.argsort(jnp.argsort(-score.reshape(N)))
        fill = (rank < rem) & ~mask.reshape(N)
        return BeitBlocks(mask.reshape(N) | fill, blocks, accepted, fill)

    return jax.vmap(row)(_row_keys(key, batch))


def beit_block_mask(
    key: jax.Array,
    batch: int,
    grid: tuple[int, int] = (14, 14),
    num_masked: int = 75,
    min_block: int = 16,
    max_block: int | None = None,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    max_attempts: int = 2048,
    proposals_per_step: int = 64,
) -> jax.Array:
    """(B, N) bool BEiT mask with exactly `num_masked` True per row, N = H * W in row-major
    order. See :func:`beit_block_mask_with_blocks` for the rules and the fallback, and
    :func:`beit_unilm_blocks` for the released sampler (which can stop short) and how they differ."""
    return beit_block_mask_with_blocks(
        key, batch, grid, num_masked, min_block, max_block, aspect, max_attempts, proposals_per_step
    ).mask


def beit_unilm_blocks(
    key: jax.Array,
    batch: int,
    grid: tuple[int, int] = (14, 14),
    num_masked: int = 75,
    min_block: int = 16,
    max_block: int | None = None,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    attempts: int = 10,
) -> tuple[jax.Array, jax.Array]:
    """BEiT's released sampler, unilm beit/masking_generator.py `MaskingGenerator`, step for step:
    (B, N) bool masks with *at most* `num_masked` True, and (B,) the number of blocks placed.

    Per block: area s ~ U(min_block, m) with m = min(num_masked − masked, max_block) (Python's
    random.uniform, so s ∈ [m, min_block] once m < min_block), log aspect uniform, h = round(√(s·r)),
    w = round(√(s/r)), kept only if h < H and w < W; top, left uniform; accepted when it adds
    between 1 and m new patches. A block gets `attempts` (10) tries; after 10 failures in a row the
    mask is final, short of `num_masked` — the difference from `beit_block_mask`, which always
    reaches the count.

    The two laws differ, measured on 14×14 / 75 / min 16 with 8,192 masks each: this sampler
    masks 74.5 patches on average (exactly 75 in 67% of images, ≥ 70 in 99.6%) in 4.1 blocks that
    form 1.4 4-connected components; `beit_block_mask` masks exactly 75 in 4.5 blocks forming 1.2
    components (its extra blocks are the small ones that complete the count, mostly touching the
    mask). A re-implementation of the reference in Python gave 74.5, 67%, 4.1 and 1.4.
    """
    H, W = grid
    max_block = num_masked if max_block is None else max_block
    if not 1 <= num_masked <= H * W:
        raise ValueError(f"need 1 <= num_masked <= {H * W}; got {num_masked}")
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    rows, cols = jnp.arange(H)[:, None], jnp.arange(W)[None, :]

    def row(k):
        def attempt(state):
            mask, count, fails, blocks, i = state
            u = _unit(jax.random.bits(jax.random.fold_in(k, i), (4,), jnp.uint32))
            m = jnp.minimum(num_masked - count, max_block)
            s = min_block + u[0] * (m - min_block)  # random.uniform(min_block, m), either order
            r = jnp.exp(log_lo + u[1] * (log_hi - log_lo))
            h = jnp.round(jnp.sqrt(s * r)).astype(jnp.int32)  # round half to even, as Python's round
            w = jnp.round(jnp.sqrt(s / r)).astype(jnp.int32)
            fits = (h < H) & (w < W)
            top = jnp.floor(u[2] * (H - h + 1)).astype(jnp.int32)  # random.randint(0, H - h)
            left = jnp.floor(u[3] * (W - w + 1)).astype(jnp.int32)
            rect = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
            new = h * w - jnp.sum(mask & rect)
            hit = fits & (new > 0) & (new <= m)
            count = count + jnp.where(hit, new, 0)
            fails = jnp.where(hit, 0, fails + 1)
            return mask | (rect & hit), count, fails, blocks + hit, i + 1

        def going(state):
            _, count, fails, _, _ = state
            return (count < num_masked) & (fails < attempts)

        zero = jnp.zeros((), jnp.int32)
        init = (jnp.zeros((H, W), bool), zero, zero, zero, jnp.zeros((), jnp.uint32))
        mask, _, _, blocks, _ = lax.while_loop(going, attempt, init)
        return mask.reshape(H * W), blocks

    return jax.vmap(row)(_row_keys(key, batch))


def beit_unilm_mask(key: jax.Array, batch: int, **kwargs) -> jax.Array:
    """(B, N) bool: :func:`beit_unilm_blocks`' masks alone (at most `num_masked` True per row)."""
    return beit_unilm_blocks(key, batch, **kwargs)[0]
