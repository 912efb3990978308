"""Training losses. Rectified flow: timestep sampling, interpolation, target, text dropout and the masked loss;
VAE: the edge loss.

Time convention (whole project): t=1 is noise, t=0 is data; x0 is the clean latent, x1 the noise, and the model
predicts v = (1 - sigma_min) x1 - x0 (Open-Sora 2.0 / MovieGen).
"""

from __future__ import annotations

import torch
from einops import repeat
from torch import Tensor

from pipelines.sampling import shift_alpha_for, time_shift

SIGMA_MIN = 1e-5
LOW_T_MIN = 0.02  # the low-noise share of `sample_timesteps` starts here


def sample_timesteps(batch: int, image_seq_len: int, t_lat: int, generator: torch.Generator | None = None,
                     shift: bool = True, uniform_share: float = 0.0, low_share: float = 0.0,
                     low_max: float = 0.4) -> Tensor:
    """Logit-normal t (B,) in (0, 1), shifted towards noise like the sampling schedule for this size.

    `uniform_share` of the samples instead draw t uniformly before the shift, i.e. distributed like the sampling
    schedule's own steps. The logit-normal almost never reaches the highest noise (0.04% of t above 0.987 at
    the default's size) while the sampler's first two steps sit there, and they commit the clip's layout.

    `low_share` of the samples draw t uniformly from [LOW_T_MIN, low_max] after the shift: the shifted logit-normal
    puts only ~5% of t below 0.2, where the outline's last detail (a triangle's corners) is settled.
    """
    for name, share in (("uniform_share", uniform_share), ("low_share", low_share)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {share}")
    if low_share and not LOW_T_MIN < low_max <= 1.0:
        raise ValueError(f"low_max must lie in ({LOW_T_MIN}, 1], got {low_max}")
    t = torch.sigmoid(torch.randn(batch, generator=generator))
    if uniform_share:
        uniform = torch.rand(batch, generator=generator) < uniform_share
        t = torch.where(uniform, torch.rand(batch, generator=generator).clamp(1e-6, 1 - 1e-6), t)
    if shift:
        t = time_shift(shift_alpha_for(image_seq_len, t_lat), t)
    if low_share:
        low = torch.rand(batch, generator=generator) < low_share
        t = torch.where(low, LOW_T_MIN + (low_max - LOW_T_MIN) * torch.rand(batch, generator=generator), t)
    return t


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    return t.to(like).reshape(-1, *([1] * (like.ndim - 1)))


def flow_interpolate(x0: Tensor, x1: Tensor, t: Tensor, sigma_min: float = SIGMA_MIN) -> Tensor:
    """x_t = (1 - t) x0 + (1 - (1 - sigma_min)(1 - t)) x1, t (B,) broadcast over the rest."""
    t = _per_sample(t, x0)
    return (1 - t) * x0 + (1 - (1 - sigma_min) * (1 - t)) * x1


def flow_target(x0: Tensor, x1: Tensor, sigma_min: float = SIGMA_MIN) -> Tensor:
    """The velocity d x_t / d t = (1 - sigma_min) x1 - x0."""
    return (1 - sigma_min) * x1 - x0


def flow_noise_for(x_t: Tensor, x0: Tensor, t: Tensor, sigma_min: float = SIGMA_MIN) -> Tensor:
    """The noise x1 that `flow_interpolate` takes with x0 to x_t (t > 0): the straight path through x_t that ends
    at x0, so `flow_target(x0, x1)` is the velocity carrying x_t to x0."""
    t = _per_sample(t, x0)
    return (x_t - (1 - t) * x0) / (1 - (1 - sigma_min) * (1 - t))


def dropout_condition(prob: float, txt: Tensor, null_txt: Tensor, generator: torch.Generator | None = None,
                      y_vec: Tensor | None = None,
                      null_y: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """Replace whole samples' text (txt (B, L, C), and y_vec (B, D) if given) by the null prompt with
    probability `prob`; returns (txt, y_vec, dropped (B,) bool)."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"dropout probability must lie in [0, 1], got {prob}")
    batch = txt.shape[0]
    dropped = torch.rand(batch, generator=generator) < prob  # (B,)
    keep = dropped.logical_not().to(txt.device)
    txt = torch.where(keep[:, None, None], txt, null_txt.to(txt).expand_as(txt))
    if y_vec is not None:
        if null_y is None:
            raise ValueError("dropping y_vec needs the null prompt's y_vec")
        y_vec = torch.where(keep[:, None], y_vec, null_y.to(y_vec).expand_as(y_vec))
    return txt, y_vec, dropped


def token_loss_weights(frame_mask: Tensor, tokens_per_frame: int) -> Tensor:
    """(B, T_lat) bool of conditioned frames -> (B, L) float weights over the packed t-major tokens (0 = skip)."""
    keep = frame_mask.logical_not().float()  # (B, T)
    return repeat(keep, "b t -> b (t n)", n=tokens_per_frame)


def get_batch_loss(pred: Tensor, target: Tensor, masks: Tensor | None = None,
                   exclude_conditioned: bool = True, weights: Tensor | None = None) -> Tensor:
    """MSE over packed tokens (B, L, C); with `masks` (B, T_lat) bool of conditioned latent frames and
    `exclude_conditioned`, those frames' tokens are left out and the mean runs over the remaining ones.

    `weights` (B, L, C), e.g. more weight where the object is, turn the mean into a weighted mean (the loss keeps
    its scale: uniform weights give the plain MSE)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if weights is not None and weights.shape != pred.shape:
        raise ValueError(f"weights {tuple(weights.shape)} do not match the prediction {tuple(pred.shape)}")
    sq = (pred.float() - target.float()).pow(2)  # (B, L, C)
    weights = torch.ones_like(sq) if weights is None else weights.to(sq.device, torch.float32)
    err, norm = (sq * weights).mean(dim=-1), weights.mean(dim=-1)  # (B, L) each
    if masks is not None and exclude_conditioned:
        t_lat = masks.shape[1]
        if err.shape[1] % t_lat:
            raise ValueError(f"{err.shape[1]} tokens do not split into {t_lat} latent frames")
        keep = token_loss_weights(masks.to(err.device), err.shape[1] // t_lat)  # (B, L)
        err, norm = err * keep, norm * keep
    return err.sum() / norm.sum().clamp(min=1e-12)


def edge_loss(recon: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """Weighted mean L1 of the error's spatial gradients (recon, target (B, C, T, H, W); weights (B, 1, T, H, W) or
    broadcastable to it): the gradient difference loss of Mathieu et al. (2016).

    A per-pixel loss barely tells a blurred outline from a sharp one (the blur costs only on the few edge pixels,
    and an average of the two sides is cheap under MSE); differences between neighbours do, so the decoder keeps
    corners and apexes instead of rounding every shape into a blob. Each difference takes the larger weight of
    its two pixels; the mean is normalised by the weights, so uniform weights give the plain mean."""
    err = (recon - target).float()
    weights = torch.ones_like(err[:, :1]) if weights is None else weights.float().expand_as(err[:, :1])
    total, norm = err.new_zeros(()), err.new_zeros(())
    for dim in (-1, -2):
        n = err.shape[dim]
        grad = (err.narrow(dim, 1, n - 1) - err.narrow(dim, 0, n - 1)).abs()  # (B, C, T, H', W')
        w = torch.maximum(weights.narrow(dim, 1, n - 1), weights.narrow(dim, 0, n - 1))
        total = total + (grad * w).mean()
        norm = norm + w.mean()
    return total / norm.clamp(min=1e-12)


def color_loss(recon: Tensor, target: Tensor, on_object: Tensor) -> Tensor:
    """Mean L1 between the object's mean colour in `recon` and in `target`, frame by frame (recon, target
    (B, C, T, H, W); on_object (B, 1, T, H, W) in [0, 1]); frames without an object count nothing.

    A per-pixel loss spreads a colour shift of the whole object over its few pixels beside the larger errors at its
    outline, so a decoder can keep the outline and still paint a red square orange on gray; the object's mean
    colour isolates exactly that shift."""
    mass = on_object.float().sum(dim=(-2, -1))  # (B, 1, T)
    present = (mass > 0).float()

    def mean_of(video: Tensor) -> Tensor:  # (B, C, T)
        return (video.float() * on_object).sum(dim=(-2, -1)) / mass.clamp(min=1.0)

    err = (mean_of(recon) - mean_of(target)).abs() * present
    return err.sum() / (present.sum() * recon.shape[1]).clamp(min=1.0)
