"""Batched tensor versions of nnU-Net's default training transforms (batchgeneratorsv2).

Each function works on a whole batch on any device (the GPU in training, the CPU in tests)
and reproduces one batchgeneratorsv2 transform for given parameters; the parameters are
drawn elsewhere (:mod:`nnunet_mamba.training.gpu_augmentation`). Shapes: images
``(B, C, *spatial)`` float32, segmentations ``(B, Cs, *spatial)`` integer, ``spatial`` of
length 2 or 3. Per-(sample, channel) parameters come as numpy arrays of shape ``(B, C)``
(or ``(B, C, dim)``) where a neutral value (0 sigma, factor 1) means "not applied".

Reference: Isensee et al., nnU-Net, Nature Methods 2021 (Suppl. "data augmentation"), and
batchgeneratorsv2's ``SpatialTransform``, ``GaussianNoiseTransform``, ``GaussianBlurTransform``,
``MultiplicativeBrightnessTransform``, ``ContrastTransform``, ``SimulateLowResolutionTransform``,
``GammaTransform``, ``MirrorTransform``, ``MaskImageTransform``, ``RemoveLabelTransform``,
``ConvertSegmentationToRegionsTransform`` and ``DownsampleSegForDSTransform``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

_UPMODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def to_device(x, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Host values as a tensor on ``device`` without a device synchronisation (pinned,
    non-blocking copy on CUDA), so that the host can queue the next kernels meanwhile."""
    t = torch.as_tensor(np.asarray(x), dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# ---- rotation and scaling: one affine grid + grid_sample ----------------------------------
def center_crop_slices(in_shape: Sequence[int], out_shape: Sequence[int]) -> tuple:
    """Slices of batchgeneratorsv2's ``crop_tensor`` around ``floor(in / 2)`` (in >= out)."""
    out = []
    for s_in, s_out in zip(in_shape, out_shape):
        start = s_in // 2 - s_out // 2
        if start < 0 or start + s_out > s_in:
            raise ValueError(f"cannot crop {tuple(out_shape)} out of {tuple(in_shape)}: the CPU "
                             "loader's patch must be at least the final patch size")
        out.append(slice(start, start + s_out))
    return tuple(out)


def affine_grid(affines: torch.Tensor, in_shape: Sequence[int], out_shape: Sequence[int]) -> torch.Tensor:
    """grid_sample grid (align_corners=False) of ``SpatialTransform`` without elastic deformation.

    affines: ``(n, d, d)``, acting on voxel offsets from the patch centre in array-axis order;
    the output patch ``out_shape`` is centred on ``in_shape / 2``. Returns ``(n, *out_shape, d)`` with the
    coordinates in grid_sample's (x, y[, z]) order.
    """
    dev = affines.device
    axes = [torch.linspace((1 - s) / 2, (s - 1) / 2, s, device=dev) for s in out_shape]
    base = torch.stack(torch.meshgrid(axes, indexing="ij"), -1)  # (*out, d)
    a = affines.to(torch.float32).view(affines.shape[0], *[1] * len(out_shape), *affines.shape[1:])
    # elementwise products, not a matmul: float32 even where matmuls are allowed to use TF32
    grid = (base[None, ..., None, :] * a).sum(-1)  # (n, *out, d): affines @ offset per voxel
    for d, s in enumerate(in_shape):  # python scalars: no host-to-device copy
        grid[..., d] /= s / 2
    return grid.flip(-1)


def resample_image(img: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear (trilinear) resampling with zero padding, as SpatialTransform's image path."""
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def resample_segmentation(seg: torch.Tensor, grid: torch.Tensor, label_values: Sequence[int],
                          pad_label: int = -1, mode: str = "bilinear",
                          tiebreak: str = "nearest") -> torch.Tensor:
    """SpatialTransform's segmentation path: per-label linear interpolation + argmax.

    Every label's indicator is resampled linearly (scores scaled by 1000 and compared in
    float16, as batchgeneratorsv2 does); outside the input counts as ``pad_label`` (its score
    is what the other labels leave of 1). Ties go to the nearest neighbour's label
    (``tiebreak='nearest'``, nnU-Net's default) or the lowest label (``'lowest'``).
    ``mode='nearest'`` is plain order-0 sampling. seg ``(n, Cs, *in)`` -> ``(n, Cs, *out)``.
    """
    shift = float(pad_label)
    nn_lab = None
    if mode == "nearest" or tiebreak == "nearest":
        nn_lab = (F.grid_sample(seg.float() - shift, grid, mode="nearest", padding_mode="zeros",
                                align_corners=False) + shift).round().to(seg.dtype)
    if mode == "nearest":
        return nn_lab
    if mode != "bilinear":
        raise ValueError(f"segmentation mode {mode!r} is not supported on the GPU path")
    values = [int(v) for v in sorted(set(int(v) for v in label_values)) if int(v) != pad_label]
    out_shape = (seg.shape[0], seg.shape[1], *grid.shape[1:-1])
    total = torch.zeros(out_shape, device=seg.device, dtype=torch.float32)
    best = torch.full(out_shape, float("-inf"), device=seg.device, dtype=torch.float16)
    result = torch.full(out_shape, pad_label, device=seg.device, dtype=seg.dtype)
    nn_score = torch.full(out_shape, float("-inf"), device=seg.device, dtype=torch.float16)
    for v in values:
        score = F.grid_sample((seg == v).float(), grid, mode="bilinear", padding_mode="zeros",
                              align_corners=False).mul_(1000)
        total += score
        q = score.half()
        better = q > best
        best = torch.maximum(best, q)
        result = torch.where(better, torch.full_like(result, v), result)
        if nn_lab is not None:
            nn_score = torch.where(nn_lab == v, q, nn_score)
    pad_q = (1000 - total).half()
    # the padding label (lowest in nnU-Net: -1) wins ties against the labels above it
    pad_better = pad_q >= best if all(pad_label < v for v in values) else pad_q > best
    result = torch.where(pad_better, torch.full_like(result, pad_label), result)
    best = torch.maximum(best, pad_q)
    if nn_lab is not None:
        nn_score = torch.where(nn_lab == pad_label, pad_q, nn_score)
        result = torch.where(nn_score == best, nn_lab, result)
    return result


def spatial_transform(img: torch.Tensor, seg: Optional[torch.Tensor], out_shape: Sequence[int],
                      affines: np.ndarray, transformed: np.ndarray, label_values: Sequence[int],
                      pad_label: int = -1, seg_mode: str = "bilinear", tiebreak: str = "nearest"):
    """Rotation/scaling of the samples with ``transformed[b]``, centre crop of the others.

    img ``(B, C, *in)``, seg ``(B, Cs, *in)`` (or None), affines ``(B, d, d)``, transformed
    ``(B,)`` bool; returns ``(B, C, *out)`` and ``(B, Cs, *out)``.
    """
    in_shape = img.shape[2:]
    crop = (slice(None), slice(None)) + center_crop_slices(in_shape, out_shape)
    img_out = img[crop].clone()
    seg_out = seg[crop].clone() if seg is not None else None
    idx = np.flatnonzero(transformed)
    if len(idx):
        sel = to_device(idx, img.device)
        grid = affine_grid(to_device(np.asarray(affines)[idx], img.device, torch.float32), in_shape, out_shape)
        img_out[sel] = resample_image(img[sel], grid)
        if seg is not None:
            seg_out[sel] = resample_segmentation(seg[sel], grid, label_values, pad_label,
                                                 seg_mode, tiebreak)
    return img_out, seg_out


# ---- intensity transforms ------------------------------------------------------------------
def _rows(img: torch.Tensor, mask: np.ndarray):
    """The (b, c) rows of ``img`` flattened to ``(B*C, *spatial)`` where ``mask`` holds."""
    idx = np.flatnonzero(np.asarray(mask).reshape(-1))
    return img.reshape(-1, *img.shape[2:]), to_device(idx, img.device), idx


def gaussian_noise(img: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
    """Adds N(0, sigma[b, c]^2) noise (GaussianNoiseTransform; 'noise_variance' is the std)."""
    flat, sel, idx = _rows(img, sigma > 0)
    if len(idx):
        s = to_device(np.asarray(sigma).reshape(-1)[idx], img.device, img.dtype)
        noise = torch.randn((len(idx), *flat.shape[1:]), device=img.device, dtype=img.dtype)
        flat.index_add_(0, sel, noise * s.view(-1, *[1] * (flat.ndim - 1)))
    return img


def gaussian_kernel(sigma: float, truncate: float = 6.0) -> torch.Tensor:
    """batchgeneratorsv2's 1-D Gaussian kernel (odd size ~ sigma * truncate), float32."""
    n = sigma * truncate + 0.5
    size = round(n)
    if size % 2 == 0:
        size = size + 1 if n - size >= 0 else size - 1
    half = (size - 1) * 0.5
    x = torch.linspace(-half, half, steps=size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return pdf / pdf.sum()


def gaussian_blur(img: torch.Tensor, sigmas: np.ndarray) -> torch.Tensor:
    """Separable Gaussian blur, axis by axis with reflect padding (GaussianBlurTransform).

    sigmas ``(B, C, dim)``; rows whose sigmas are all 0 are left untouched. The taps are
    summed explicitly (float32 everywhere; a cuDNN convolution could run in TF32).
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    flat, sel, idx = _rows(img, (sigmas > 0).any(-1))
    if not len(idx):
        return img
    dim = img.ndim - 2
    x = flat[sel][None]  # (1, N, *spatial)
    rows = sigmas.reshape(-1, dim)[idx]
    for d in range(dim):
        kernels = [gaussian_kernel(s) if s > 0 else torch.ones(1) for s in rows[:, d]]
        k = max(len(t) for t in kernels)
        weight = torch.zeros(len(kernels), k)
        for i, t in enumerate(kernels):
            off = (k - len(t)) // 2
            weight[i, off:off + len(t)] = t
        weight = to_device(weight, img.device, img.dtype).view(1, len(kernels), k, *[1] * dim)
        pad = [0] * (2 * dim)
        pad[2 * (dim - 1 - d)] = pad[2 * (dim - 1 - d) + 1] = k // 2
        xp = F.pad(x, pad, mode="reflect")
        out = torch.zeros_like(x)
        for j in range(k):
            out += xp.narrow(2 + d, j, x.shape[2 + d]) * weight[:, :, j]
        x = out
    flat.index_copy_(0, sel, x[0])
    return img


def multiplicative_brightness(img: torch.Tensor, multipliers: np.ndarray) -> torch.Tensor:
    """img[b, c] *= multipliers[b, c] (MultiplicativeBrightnessTransform)."""
    flat, sel, idx = _rows(img, multipliers != 1)
    if len(idx):
        m = to_device(np.asarray(multipliers, np.float32).reshape(-1)[idx], img.device)
        flat.index_copy_(0, sel, flat[sel] * m.view(-1, *[1] * (flat.ndim - 1)))
    return img


def contrast(img: torch.Tensor, factors: np.ndarray, preserve_range: bool = True) -> torch.Tensor:
    """(x - mean) * factor + mean per (b, c), clipped to the old range (ContrastTransform)."""
    flat, sel, idx = _rows(img, factors != 1)
    if len(idx):
        x = flat[sel].reshape(len(idx), -1)
        m = to_device(np.asarray(factors, np.float32).reshape(-1)[idx], img.device)[:, None]
        mean = x.mean(1, keepdim=True)
        y = (x - mean) * m + mean
        if preserve_range:
            lo, hi = torch.aminmax(x, dim=1, keepdim=True)
            y = torch.minimum(torch.maximum(y, lo), hi)
        flat.index_copy_(0, sel, y.view(len(idx), *flat.shape[1:]))
    return img


def simulate_low_resolution(img: torch.Tensor, jobs) -> torch.Tensor:
    """Nearest-exact downsampling to ``round(shape * scale)`` and linear upsampling back
    (SimulateLowResolutionTransform). jobs: iterable of ``(b, c, scales)``; one call each,
    since every channel gets its own low-resolution shape."""
    shape = img.shape[2:]
    for b, c, scales in jobs:
        new_shape = [round(s * float(f)) for s, f in zip(shape, scales)]
        down = F.interpolate(img[b, c][None, None], new_shape, mode="nearest-exact")
        img[b, c] = F.interpolate(down, shape, mode=_UPMODES[len(shape)])[0, 0]
    return img


def gamma(img: torch.Tensor, gammas: np.ndarray, invert: np.ndarray, retain_stats: np.ndarray,
          eps: float = 1e-7) -> torch.Tensor:
    """Gamma on the [min, max]-normalised intensities, optionally of the inverted image and
    with mean/std restored (GammaTransform). gammas ``(B, C)``, 0 = not applied."""
    flat, sel, idx = _rows(img, gammas != 0)
    if not len(idx):
        return img
    dev = img.device
    x = flat[sel].reshape(len(idx), -1)
    g = to_device(np.asarray(gammas, np.float32).reshape(-1)[idx], dev)[:, None]
    sign = to_device(np.where(np.asarray(invert).reshape(-1)[idx], -1.0, 1.0), dev, x.dtype)[:, None]
    keep = to_device(np.asarray(retain_stats).reshape(-1)[idx], dev)[:, None]
    x = x * sign
    mean, std = x.mean(1, keepdim=True), x.std(1, keepdim=True)
    lo, hi = torch.aminmax(x, dim=1, keepdim=True)
    rng = hi - lo
    y = ((x - lo) / rng.clamp(min=eps)).pow(g) * rng + lo
    y_kept = (y - y.mean(1, keepdim=True)) * (std / y.std(1, keepdim=True).clamp(min=eps)) + mean
    y = torch.where(keep, y_kept, y) * sign
    flat.index_copy_(0, sel, y.view(len(idx), *flat.shape[1:]))
    return img


# ---- mirroring, masking, labels ---------------------------------------------------------------
def mirror(tensors: Sequence[Optional[torch.Tensor]], axes_per_sample: Sequence[Sequence[int]]):
    """Flips sample b of every tensor along its spatial ``axes_per_sample[b]`` (MirrorTransform)."""
    for b, axes in enumerate(axes_per_sample):
        if len(axes):
            for t in tensors:
                if t is not None:
                    t[b] = torch.flip(t[b], [a + 1 for a in axes])
    return tensors


def mask_image(img: torch.Tensor, seg: torch.Tensor, channels: Sequence[int], seg_channel: int = 0,
               value: float = 0.0) -> torch.Tensor:
    """Sets the given image channels to ``value`` where seg[:, seg_channel] < 0 (MaskImageTransform)."""
    if len(channels):
        outside = seg[:, seg_channel] < 0
        if sorted(channels) == list(range(img.shape[1])):  # every channel: one kernel
            img.masked_fill_(outside.unsqueeze(1), value)
        else:
            for c in channels:
                img[:, c].masked_fill_(outside, value)
    return img


def remove_label(seg: torch.Tensor, label: int, set_to: int, channels=None) -> torch.Tensor:
    """seg[seg == label] = set_to in the given channels (all if None) (RemoveLabelTransform)."""
    if channels is None:
        return seg.masked_fill_(seg == label, set_to)
    for c in channels:
        seg[:, c].masked_fill_(seg[:, c] == label, set_to)
    return seg


_REGION_TABLES: dict = {}


def _region_table(regions: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """(R, max_label + 3) bool on ``device``: column v + 1 says which regions hold label v;
    column 0 (padding -1) and the last (labels above every region's) hold none."""
    key = (tuple(tuple(int(v) for v in r) for r in regions), str(device))
    table = _REGION_TABLES.get(key)
    if table is None:
        top = max([v for r in key[0] for v in r] + [0])
        host = np.zeros((len(regions), top + 3), dtype=bool)
        for r, labels in enumerate(key[0]):
            host[r, [v + 1 for v in labels if v >= 0]] = True
        table = _REGION_TABLES[key] = to_device(host, device)
    return table


def to_regions(seg: torch.Tensor, regions: Sequence[Sequence[int]], channel: int = 0) -> torch.Tensor:
    """One boolean channel per region: the voxels whose label is in the region
    (ConvertSegmentationToRegionsTransform). ``(B, Cs, *s)`` -> ``(B, R, *s)`` bool, by one
    table lookup instead of a comparison per label and region."""
    table = _region_table(regions, seg.device)
    index = (seg[:, channel].long() + 1).clamp_(0, table.shape[1] - 1)
    return table[:, index].movedim(0, 1).contiguous()


def downsample_for_deep_supervision(seg: torch.Tensor, scales) -> list:
    """Nearest-exact downsampled targets, one per deep-supervision output (DownsampleSegForDSTransform)."""
    out, seg_float = [], None
    for s in scales:
        if not isinstance(s, (tuple, list)):
            s = [s] * (seg.ndim - 2)
        if all(i == 1 for i in s):
            out.append(seg)
            continue
        new_shape = [round(i * j) for i, j in zip(seg.shape[2:], s)]
        if seg_float is None:
            seg_float = seg.float()
        out.append(F.interpolate(seg_float, new_shape, mode="nearest-exact").to(seg.dtype))
    return out
