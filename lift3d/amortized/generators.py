"""Amortized generators: a prompt's frozen text embedding -> a renderable NeRF field.

A generator maps text embeddings [B, T, D] (``Teacher.text_embedding``) to B *fields*, each a
module ``unit points [N, 3] in [0, 1]^3 -> raw [N, 4]`` (raw density, raw albedo). A field is
wrapped in :class:`GeneratedNeRF`, a :class:`~lift3d.representations.nerf.NeRF` whose field comes
from the generator, so rendering (occupancy-grid ray marching, compositing, shading),
regularisers, mesh extraction and export are the NeRF's own code and kernels.

Types (``generator.type``):
- ``hyper-ingp`` (ATT3D, ScaleDreamer's Hyper-iNGP): one shared hash grid; a hypernetwork emits
  the weights of the MLP head that decodes the grid features, per prompt.
- ``triplane`` (Instant3D / ScaleDreamer's triplane transformer): learned plane queries
  cross-attend to the text tokens, a conv decoder upsamples them to three feature planes,
  a shared MLP decodes the summed plane features.
- ``voxel-3dconv`` (ScaleDreamer's 3DConv-net, after CC3D): the pooled text embedding seeds a
  small 3D-conv generator of a feature volume, a shared MLP decodes trilinear samples of it.

``materialize`` turns one prompt's field into plain trainable parameters (a ``GeneratedNeRF``
that ``lift3d run`` can refine and export like any representation).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lift3d import registry
from lift3d.config import registered_name
from lift3d.kernels.hashgrid import HashGridConfig, HashGridEncoding
from lift3d.kernels.raymarch import OccupancyGridConfig
from lift3d.registry import register
from lift3d.representations.nerf import NeRF, NeRFConfig, _mlp

# ------------------------------------------------------------------------- the rendered field


def default_field_nerf() -> NeRFConfig:
    """Render settings of generated fields (a small grid: the generator, not the grid, carries the prompt)."""
    return NeRFConfig(
        encoding=HashGridConfig(n_levels=8, n_features_per_level=2, log2_hashmap_size=15, base_resolution=16,
                                per_level_scale=1.447269237440378),
        hidden_dim=32, blob_std=0.6, num_samples_per_ray=96, normals="none", mesh_resolution=96,
        occupancy=OccupancyGridConfig(resolution=32, warmup_steps=64, update_every=8),
    )


class GeneratedNeRF(NeRF):
    """A NeRF whose field (``unit points -> raw density, raw albedo``) comes from a generator.

    Everything else (ray marching, shading, regularisers, ``surface`` for mesh export, occupancy
    updates) is inherited. The occupancy grid starts from the field itself (:meth:`refresh_grid`),
    so a freshly generated object renders without a warm-up.
    """

    def __init__(self, config: NeRFConfig, field_module: nn.Module, lr: float = 1e-3):
        nn.Module.__init__(self)  # not NeRF.__init__: the field replaces its hash grid and MLP
        if config.background == "neural" or config.progressive_start_levels:
            raise ValueError("generated fields support representation background solid/random and no progressive levels")
        self.setup_rendering(config)
        self.field = field_module
        self.field_lr = lr

    def _field_output(self, unit: Tensor) -> Tensor:
        return self.field(unit)

    @torch.no_grad()
    def refresh_grid(self) -> None:
        """Occupancy from this field's density at every cell (one warm-up update; fixed probe
        points, so the same field always gets the same grid)."""
        was_training = self.grid.training
        self.grid.train()
        probes = torch.Generator(self.grid.aabb.device).manual_seed(0)
        self.grid.update(0, self.density, self.step_size, generator=probes)
        self.grid.train(was_training)

    def param_groups(self) -> list[dict]:
        return [{"name": "field", "params": [p for p in self.field.parameters() if p.requires_grad], "lr": self.field_lr}]


# ------------------------------------------------------------------------------ base class


class Generator(nn.Module):
    """Text embeddings [B, T, D] -> B fields; subclasses set ``nerf`` (their render settings)."""

    nerf: NeRFConfig

    def fields(self, embeddings: Tensor) -> list[nn.Module]:
        raise NotImplementedError

    def forward(self, embeddings: Tensor) -> list[nn.Module]:
        if embeddings.dim() != 3:
            raise ValueError(f"text embeddings must be [B, tokens, dim], got {tuple(embeddings.shape)}")
        return self.fields(embeddings)

    def param_groups(self) -> list[dict]:
        raise NotImplementedError

    def representation(self, embedding: Tensor, lr: float = 1e-3) -> GeneratedNeRF:
        """One prompt's field ([1, T, D] or [T, D] embedding) as trainable, detached parameters."""
        if embedding.dim() == 2:
            embedding = embedding.unsqueeze(0)
        with torch.no_grad():
            field_module = self(embedding)[0]
        rep = GeneratedNeRF(self.nerf, materialize(field_module), lr=lr)
        rep.to(embedding.device)
        rep.refresh_grid()
        return rep


def materialize(module: nn.Module) -> nn.Module:
    """A deep copy whose tensors (generator outputs included) are detached trainable parameters."""
    clone = copy.deepcopy(module)
    clone.requires_grad_(True)
    for sub in clone.modules():
        for name in getattr(sub, "generated", ()):
            value = getattr(sub, name)
            delattr(sub, name)
            if isinstance(value, (list, tuple)):
                sub.register_module(name, nn.ParameterList([nn.Parameter(v.detach().clone()) for v in value]))
            else:
                sub.register_parameter(name, nn.Parameter(value.detach().clone()))
    return clone


class _TextPool(nn.Module):
    """[B, T, D] -> [B, out]: flatten the tokens (positions matter) or mean-pool them, then LayerNorm."""

    def __init__(self, tokens: int, dim: int, pooling: str):
        super().__init__()
        self.pooling = pooling
        self.out_dim = tokens * dim if pooling == "flatten" else dim
        self.norm = nn.LayerNorm(self.out_dim)

    def forward(self, embeddings: Tensor) -> Tensor:
        pooled = embeddings.flatten(1) if self.pooling == "flatten" else embeddings.mean(dim=1)
        return self.norm(pooled)


# ------------------------------------------------------------------------------- hyper-ingp


@dataclass
class HyperINGPConfig:
    """Hyper-iNGP (ATT3D / ScaleDreamer): shared hash grid + hypernetwork-emitted MLP head."""

    nerf: NeRFConfig = field(default_factory=default_field_nerf)
    """Render settings and the field's shape: ``nerf.encoding`` is the shared hash grid,
    ``nerf.hidden_dim``/``hidden_layers`` the per-prompt head the hypernetwork emits."""
    pooling: Literal["flatten", "mean"] = "flatten"
    """How the text tokens reach the hypernetwork: all tokens concatenated, or their mean (long
    CLIP sequences)."""
    hyper_hidden: int = 64
    """Width of the hypernetwork (ScaleDreamer: 64)."""
    hyper_layers: int = 1
    """Hidden layers of the hypernetwork."""
    delta_scale: float = 1.0
    """Scale of the emitted weights' per-prompt part on top of the shared base head."""
    lr_encoding: float = 0.01
    """Adam learning rate of the shared hash grid."""
    lr_network: float = 0.001
    """Adam learning rate of the hypernetwork and the base head."""


class HyperField(nn.Module):
    """Hash-grid features -> an MLP whose weights are tensors (generated or, materialized, parameters)."""

    generated = ("weights",)

    def __init__(self, encoding: HashGridEncoding, weights: list[Tensor]):
        super().__init__()
        self.encoding = encoding
        self.weights = weights  # [W0, b0, W1, b1, ...]

    def forward(self, unit: Tensor) -> Tensor:
        h = self.encoding(unit)
        weights = list(self.weights)
        pairs = list(zip(weights[0::2], weights[1::2]))
        for index, (weight, bias) in enumerate(pairs):
            h = F.linear(h, weight, bias)
            if index < len(pairs) - 1:
                h = F.relu(h)
        return h


def _mlp_layers(in_dim: int, out_dim: int, hidden: int, layers: int, hidden_act: type = nn.ReLU) -> nn.Sequential:
    modules: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers):
        modules += [nn.Linear(dim, hidden), hidden_act()]
        dim = hidden
    modules.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*modules)


@register("generator", "hyper-ingp", HyperINGPConfig)
class HyperINGP(Generator):
    """ATT3D's Hyper-iNGP: weights of the head = base + delta_scale * hypernet(text)."""

    def __init__(self, config: HyperINGPConfig, tokens: int, dim: int):
        super().__init__()
        self.config = config
        self.nerf = config.nerf
        self.encoding = HashGridEncoding(config.nerf.encoding, tier=config.nerf.kernel_tier or None)
        base = _mlp(self.encoding.output_dim, 4, config.nerf.hidden_dim, config.nerf.hidden_layers)
        self.base = nn.ParameterList([nn.Parameter(p.detach().clone()) for p in base.parameters()])
        self.shapes = [tuple(p.shape) for p in self.base]
        self.pool = _TextPool(tokens, dim, config.pooling)
        total = sum(math.prod(shape) for shape in self.shapes)
        self.hypernetwork = _mlp_layers(self.pool.out_dim, total, config.hyper_hidden, config.hyper_layers, nn.SiLU)
        # Small last layer: every prompt starts near the shared base head (a plain NeRF's init).
        with torch.no_grad():
            self.hypernetwork[-1].weight.mul_(0.1)
            self.hypernetwork[-1].bias.zero_()

    def fields(self, embeddings: Tensor) -> list[nn.Module]:
        flat = self.hypernetwork(self.pool(embeddings)) * self.config.delta_scale  # [B, total]
        fields = []
        for row in flat:
            weights, offset = [], 0
            for base, shape in zip(self.base, self.shapes):
                size = math.prod(shape)
                # Fan-in scaling keeps the emitted part of each layer as large as a default init.
                fan_in = shape[-1] if len(shape) == 2 else 1
                weights.append(base + row[offset : offset + size].view(shape) / math.sqrt(fan_in))
                offset += size
            fields.append(HyperField(self.encoding, weights))
        return fields

    def param_groups(self) -> list[dict]:
        return [
            {"name": "encoding", "params": list(self.encoding.parameters()), "lr": self.config.lr_encoding},
            {"name": "network", "params": [*self.base, *self.pool.parameters(), *self.hypernetwork.parameters()],
             "lr": self.config.lr_network},
        ]


# ---------------------------------------------------------------------------------- triplane


@dataclass
class TriplaneConfig:
    """Text tokens -> triplane (Instant3D / ScaleDreamer's triplane transformer, tiny by default)."""

    nerf: NeRFConfig = field(default_factory=default_field_nerf)
    """Render settings (``nerf.encoding`` is unused: the planes are the features)."""
    width: int = 64
    """Transformer width."""
    layers: int = 2
    """Transformer decoder layers (plane queries self-attend and cross-attend to the text)."""
    heads: int = 4
    """Attention heads."""
    query_resolution: int = 8
    """Side of each plane's query grid (3 * query_resolution^2 tokens)."""
    upsample: int = 2
    """Conv-transpose x2 stages after the transformer (plane side = query_resolution * 2^upsample)."""
    plane_channels: int = 16
    """Channels of each plane."""
    decoder_hidden: int = 32
    """Width of the shared MLP that decodes plane features."""
    lr: float = 0.001
    """Adam learning rate."""


class PlaneField(nn.Module):
    """Summed bilinear samples of three planes (xy, xz, yz) -> shared MLP decoder."""

    generated = ("planes",)

    def __init__(self, planes: Tensor, decoder: nn.Module):
        super().__init__()
        self.planes = planes  # [3, C, R, R]
        self.decoder = decoder

    def forward(self, unit: Tensor) -> Tensor:
        coords = unit * 2.0 - 1.0
        pairs = torch.stack([coords[:, [0, 1]], coords[:, [0, 2]], coords[:, [1, 2]]])  # [3, N, 2]
        sampled = F.grid_sample(self.planes, pairs.unsqueeze(2), mode="bilinear", align_corners=False)  # [3, C, N, 1]
        return self.decoder(sampled.sum(0)[..., 0].transpose(0, 1))


@register("generator", "triplane", TriplaneConfig)
class TriplaneGenerator(Generator):
    def __init__(self, config: TriplaneConfig, tokens: int, dim: int):
        super().__init__()
        self.config = config
        self.nerf = config.nerf
        q = config.query_resolution
        self.text_in = nn.Linear(dim, config.width)
        self.queries = nn.Parameter(0.02 * torch.randn(3 * q * q, config.width))
        layer = nn.TransformerDecoderLayer(config.width, config.heads, 2 * config.width, dropout=0.0, batch_first=True)
        self.transformer = nn.TransformerDecoder(layer, config.layers)
        ups: list[nn.Module] = []
        channels = config.width
        for _ in range(config.upsample):
            ups += [nn.ConvTranspose2d(channels, config.plane_channels * 2, 4, stride=2, padding=1), nn.SiLU()]
            channels = config.plane_channels * 2
        ups.append(nn.Conv2d(channels, config.plane_channels, 3, padding=1))
        self.upsampler = nn.Sequential(*ups)
        self.decoder = _mlp_layers(config.plane_channels, 4, config.decoder_hidden, 1)

    def fields(self, embeddings: Tensor) -> list[nn.Module]:
        B, q = embeddings.shape[0], self.config.query_resolution
        text = self.text_in(embeddings)
        tokens = self.transformer(self.queries.expand(B, -1, -1), text)  # [B, 3 q^2, W]
        grid = tokens.view(B * 3, q, q, -1).permute(0, 3, 1, 2)
        planes = self.upsampler(grid)
        planes = planes.view(B, 3, *planes.shape[1:])
        return [PlaneField(planes[b], self.decoder) for b in range(B)]

    def param_groups(self) -> list[dict]:
        return [{"name": "network", "params": list(self.parameters()), "lr": self.config.lr}]


# ------------------------------------------------------------------------------ voxel-3dconv


@dataclass
class Voxel3DConvConfig:
    """Pooled text -> 3D-conv generator of a feature volume (ScaleDreamer's 3DConv-net, tiny)."""

    nerf: NeRFConfig = field(default_factory=default_field_nerf)
    """Render settings (``nerf.encoding`` is unused: the volume is the feature)."""
    base_resolution: int = 4
    """Side of the first volume the text is projected to."""
    upsample: int = 3
    """Trilinear x2 + conv stages (volume side = base_resolution * 2^upsample)."""
    channels: int = 32
    """Channels of the conv stages."""
    volume_channels: int = 8
    """Channels of the output feature volume."""
    decoder_hidden: int = 32
    """Width of the shared MLP that decodes volume features."""
    pooling: Literal["flatten", "mean"] = "flatten"
    """How the text tokens are pooled before the projection."""
    lr: float = 0.002
    """Adam learning rate."""


class VolumeField(nn.Module):
    """Trilinear samples of a feature volume -> shared MLP decoder."""

    generated = ("volume",)

    def __init__(self, volume: Tensor, decoder: nn.Module):
        super().__init__()
        self.volume = volume  # [C, R, R, R], axes (z, y, x) as grid_sample reads them
        self.decoder = decoder

    def forward(self, unit: Tensor) -> Tensor:
        coords = (unit * 2.0 - 1.0).view(1, -1, 1, 1, 3)
        sampled = F.grid_sample(self.volume.unsqueeze(0), coords, mode="bilinear", align_corners=False)
        return self.decoder(sampled.view(self.volume.shape[0], -1).transpose(0, 1))


@register("generator", "voxel-3dconv", Voxel3DConvConfig)
class Voxel3DConvGenerator(Generator):
    def __init__(self, config: Voxel3DConvConfig, tokens: int, dim: int):
        super().__init__()
        self.config = config
        self.nerf = config.nerf
        r, c = config.base_resolution, config.channels
        self.pool = _TextPool(tokens, dim, config.pooling)
        self.project = nn.Linear(self.pool.out_dim, c * r**3)
        stages: list[nn.Module] = []
        for _ in range(config.upsample):
            stages += [nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
                       nn.Conv3d(c, c, 3, padding=1), nn.SiLU()]
        stages.append(nn.Conv3d(c, config.volume_channels, 3, padding=1))
        self.convs = nn.Sequential(*stages)
        self.decoder = _mlp_layers(config.volume_channels, 4, config.decoder_hidden, 1)

    def fields(self, embeddings: Tensor) -> list[nn.Module]:
        B, r = embeddings.shape[0], self.config.base_resolution
        seed = self.project(self.pool(embeddings)).view(B, self.config.channels, r, r, r)
        volumes = self.convs(F.silu(seed))
        return [VolumeField(volumes[b], self.decoder) for b in range(B)]

    def param_groups(self) -> list[dict]:
        return [{"name": "network", "params": list(self.parameters()), "lr": self.config.lr}]


def build_generator(config: object, tokens: int, dim: int) -> Generator:
    cls = registry.lookup("generator", registered_name("generator", config)).cls
    return cls(config, tokens, dim)
