"""CIMD, collectively intelligent medical diffusion (Rahman et al., "Ambiguous Medical Image
Segmentation using Diffusion Models", CVPR 2023): a conditional denoiser driven by a latent ``z``
that models how annotators disagree.

- Posterior, the "ambiguity modelling network" ``q(z | image, mask)``: a Gaussian encoder of the
  image and one rater's mask (a random rater per training sample).
- Prior, the "ambiguity controlling network" ``p(z | image)``: a Gaussian encoder of the image alone,
  pulled towards the posterior by ``KL(q || p)`` (the loss term returned by :meth:`CIMD.extra_loss`).
- Reconstruction head (as the Probabilistic U-Net's): rater mask logits from the image features and
  ``z`` alone, supervised with Dice + CE. The denoiser sees the mask through ``x_t`` at all but the
  noisiest steps, so it gains little from ``z`` and the posterior tends to collapse onto the prior:
  on the ambiguous phantom of ``tests/test_networks.py`` (300 steps, 3 seeds) the samples
  followed the raters in 1 run of 3 without this head and in 3 of 3 with it.
- Denoiser: a light noisy-mask path conditioned on a once-per-image image path (as MedSegDiff here,
  with additive fusion); ``z`` enters every level through the time embedding's scale and shift, and
  the output head as broadcast channels.

Training uses ``z ~ q`` (:meth:`CIMD.training_condition`); sampling draws one ``z ~ p`` per ensemble
member (:meth:`CIMD.member_condition`, called by the sampler), kept fixed over that member's steps,
so the spread of the samples follows the annotators' disagreement.

Unlike the public code, both encoders are trained and ``z`` is used by the denoiser; 2D and 3D,
any number of classes, any size divisible by ``2 ** (len(channels) - 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from ..losses import diagonal_gaussian_kl, dice_ce
from .blocks import FiLM, ImageEncoderDecoder, TimeEmbedding, conv, pointwise, resize, two_path_widths


class GaussianEncoder(nn.Module):
    """Convolutional encoder -> global average and maximum -> ``(mu, logvar)`` of an axis-aligned
    Gaussian.

    No normalisation layers (a group norm before the global average would remove most of what the
    average can carry); the global maximum lets a small region (where annotators disagree) move
    ``z``: with the average alone, the posterior learnt to separate the raters of the test phantom
    ~10x less within 300 steps.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        channels: channels per level (every level after the first halves the resolution).
        latent_dim: size of ``z``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, channels: Sequence[int], latent_dim: int) -> None:
        super().__init__()
        ch = [in_channels, *channels]
        self.features = nn.Sequential(
            *(Convolution(spatial_dims, ch[i], ch[i + 1], strides=1 if i == 0 else 2, kernel_size=3, act="SWISH") for i in range(len(ch) - 1))
        )
        self.head = nn.Linear(2 * ch[-1], 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x).flatten(2)
        mu, logvar = self.head(torch.cat([f.mean(2), f.amax(2)], dim=1)).chunk(2, dim=1)
        return mu, logvar.clamp(-10.0, 10.0)


class CIMD(nn.Module):
    """Latent-conditioned two-path denoiser with a prior and a posterior over the annotator latent.

    The condition is a dict ``{"feats": [...], "mu", "logvar", "z"}``: image features per level,
    the prior's parameters and the latent used by :meth:`forward` (the prior mean after
    :meth:`condition`; a posterior sample in training; a prior sample per member at sampling).

    Args:
        spatial_dims: 2 or 3.
        image_channels: input image channels (2.5D context included).
        num_classes: mask channels (one-hot, background included).
        channels: image-path channels per level.
        mask_channels: mask-path channels per level (default: a quarter of ``channels``, >= 8).
        norm_num_groups: group-norm groups (capped at 8).
        latent_dim: size of the annotator latent ``z``.
        kl_weight: weight of ``KL(q || p)`` (per sample, summed over ``z``) against the denoising
            loss, which is a per-voxel mean.
        free_nats: KL (batch mean, nats) the posterior may carry before it is pulled towards the
            prior; the prior is always pulled towards the posterior (KL balancing).
        recon_weight: weight of the reconstruction head's Dice + CE.
        encoder_channels: channels per level of the prior and posterior encoders (default:
            ``mask_channels``).
    """

    def __init__(
        self,
        spatial_dims: int,
        image_channels: int,
        num_classes: int,
        channels: Sequence[int] = (32, 64, 64),
        mask_channels: Sequence[int] | None = None,
        norm_num_groups: int = 8,
        latent_dim: int = 6,
        kl_weight: float = 0.01,
        free_nats: float = 1.0,
        recon_weight: float = 1.0,
        encoder_channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        ch, mch, groups = two_path_widths(channels, mask_channels, norm_num_groups)
        self.spatial_dims, self.latent_dim = spatial_dims, int(latent_dim)
        self.kl_weight, self.free_nats, self.recon_weight = float(kl_weight), float(free_nats), float(recon_weight)
        enc = list(encoder_channels or mch)
        self.prior = GaussianEncoder(spatial_dims, image_channels, enc, latent_dim)
        self.posterior = GaussianEncoder(spatial_dims, image_channels + num_classes, enc, latent_dim)
        self.image_path = ImageEncoderDecoder(spatial_dims, image_channels, ch, groups=groups)
        self.project = nn.ModuleList(pointwise(spatial_dims, c, m) for c, m in zip(ch, mch))
        emb = mch[1] * 2
        self.temb = TimeEmbedding(emb)  # outputs 2 * emb
        self.zemb = nn.Sequential(nn.Linear(latent_dim, 2 * emb), nn.SiLU(), nn.Linear(2 * emb, 2 * emb))
        self.inp = conv(spatial_dims, num_classes, mch[1], stride=2, groups=groups)
        self.down = nn.ModuleList(conv(spatial_dims, mch[i], mch[i + 1], stride=2, groups=groups) for i in range(1, len(mch) - 1))
        self.enc = nn.ModuleList(conv(spatial_dims, m, m, groups=groups) for m in mch[1:])
        self.film = nn.ModuleList(FiLM(emb, m) for m in mch[1:])
        self.mid = conv(spatial_dims, mch[-1], mch[-1], groups=groups)
        self.up = nn.ModuleList(conv(spatial_dims, mch[i + 1] + mch[i], mch[i], groups=groups) for i in range(1, len(mch) - 1))
        self.out = nn.Sequential(
            pointwise(spatial_dims, mch[1] + mch[0] + num_classes + latent_dim, mch[0]),
            nn.SiLU(),
            pointwise(spatial_dims, mch[0], num_classes),
        )
        self.recon = nn.Sequential(
            pointwise(spatial_dims, mch[0] + latent_dim, 2 * mch[0]), nn.SiLU(),
            pointwise(spatial_dims, 2 * mch[0], 2 * mch[0]), nn.SiLU(),
            pointwise(spatial_dims, 2 * mch[0], num_classes),
        )
        self._aux: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # -- conditions -----------------------------------------------------------------------
    def _features(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [p(f) for p, f in zip(self.project, self.image_path(image))]

    def condition(self, image: torch.Tensor) -> dict:
        """Once per image: image features and the prior; ``z`` is the prior mean until
        :meth:`member_condition` draws one per member."""
        mu, logvar = self.prior(image)
        return {"feats": self._features(image), "mu": mu, "logvar": logvar, "z": mu}

    def training_condition(self, image: torch.Tensor, x0: torch.Tensor) -> dict:
        """Training: ``z ~ q(z | image, mask)`` (reparameterised); keeps ``KL(q || p)`` and the
        reconstruction head's logits (with the mask) for :meth:`extra_loss`."""
        mu_p, logvar_p = self.prior(image)
        mu_q, logvar_q = self.posterior(torch.cat([image, x0.to(image.dtype)], dim=1))
        z = mu_q + (0.5 * logvar_q).exp() * torch.randn_like(mu_q)
        # KL balancing: the prior always moves towards the posterior; the posterior is pulled
        # towards the prior only beyond ``free_nats`` (so it is not collapsed before the denoiser
        # learns to use z)
        kl_prior = diagonal_gaussian_kl(mu_q.detach(), logvar_q.detach(), mu_p, logvar_p).mean()
        kl_post = diagonal_gaussian_kl(mu_q, logvar_q, mu_p.detach(), logvar_p.detach()).mean()
        feats = self._features(image)
        recon = self.recon(torch.cat([feats[0], self._zmap(z, feats[0])], dim=1))
        self._aux = (kl_prior + kl_post.clamp_min(self.free_nats), recon, x0)
        return {"feats": feats, "mu": mu_p, "logvar": logvar_p, "z": z}

    def member_condition(self, cond: dict, n: int, generator: torch.Generator | None = None) -> dict:
        """Sampling: repeat the condition for ``n`` members (member-major, like
        ``sampler.repeat_members``) and draw one ``z ~ p(z | image)`` per member and image."""
        rep = lambda c: c.repeat(n, *([1] * (c.ndim - 1)))  # noqa: E731
        mu, logvar = rep(cond["mu"]), rep(cond["logvar"])
        eps = torch.randn(mu.shape, generator=generator, device="cpu").to(mu.device, mu.dtype)
        return {"feats": [rep(f) for f in cond["feats"]], "mu": mu, "logvar": logvar, "z": mu + (0.5 * logvar).exp() * eps}

    def extra_loss(self) -> torch.Tensor | None:
        """``kl_weight * KL(q || p) + recon_weight * (Dice + CE)`` of the last
        :meth:`training_condition` (then cleared)."""
        aux, self._aux = self._aux, None
        if aux is None:
            return None
        kl, recon, x0 = aux
        return self.kl_weight * kl + self.recon_weight * dice_ce(recon, x0)

    def _zmap(self, z: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``z [B, L]`` broadcast to ``[B, L, *spatial of like]``."""
        return z.to(like.dtype).reshape(*z.shape, *([1] * self.spatial_dims)).expand(-1, -1, *like.shape[2:])

    # -- denoiser -------------------------------------------------------------------------
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        feats, z = cond["feats"], cond["z"].to(x_t.dtype)
        emb = self.temb(t) + self.zemb(z)
        h = self.inp(x_t)
        skips = []
        for i, m_i in enumerate(feats[1:]):
            if i > 0:
                h = self.down[i - 1](h)
            h = self.film[i](self.enc[i](h + m_i), emb)
            skips.append(h)
        h = self.mid(h)
        for i in reversed(range(len(self.up))):
            h = F.interpolate(h, size=skips[i].shape[2:], mode="nearest")
            h = self.up[i](torch.cat([h, skips[i]], dim=1))
        return self.out(torch.cat([resize(h, x_t.shape[2:]), feats[0], x_t, self._zmap(z, x_t)], dim=1))
