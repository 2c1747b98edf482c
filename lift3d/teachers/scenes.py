"""Analytic scenes: a tiny prompt grammar, SDF primitives, sphere-traced renders and meshes.

A prompt is ``a <color> <shape> [<motion>]``, optionally followed by ``on a <color> <shape>
[<motion>]``; articles (a/an/the), case, surrounding whitespace and trailing punctuation are
ignored. Each prompt names a :class:`Scene`: one or two exact-SDF primitives (world z up, as in
``lift3d.cameras``) that fit inside a ball of radius ``TARGET_RADIUS`` around the origin. "X on
Y" stacks X on top of Y, touching, with the stack centred at the origin.

Motion words make a scene dynamic over the time t in [0, 1] (``Scene.at(t)`` is the static
scene at t; the rest pose is the static prompt's): ``bouncing`` lifts the part by
``BOUNCE_HEIGHT sin(pi t)`` (up and back down), ``spinning`` turns it by ``180 t`` degrees about
the world x axis (the front camera's line of sight), ``sliding left`` / ``sliding right`` moves
it from ``+-SLIDE_DISTANCE`` to ``-+SLIDE_DISTANCE`` along y (left / right as seen from the
front) and ``growing`` scales it by ``GROW_FROM + (1 - GROW_FROM) t`` about its centre. A
spinning sphere or cylinder looks static (its spin is a symmetry).

The scene is the ground truth of the analytic teacher: ``Scene.render`` is the reference image
(sphere tracing with a fixed number of steps, Lambertian + ambient shading with a light fixed
in world space, a fixed background) and ``Scene.mesh`` the reference geometry.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from skimage.measure import marching_cubes
from torch import Tensor

from lift3d.cameras import Cameras

BACKGROUND: tuple[float, float, float] = (0.75, 0.8, 0.9)
"""Background colour of every reference render (a pale blue that is not in the palette)."""

PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.15, 0.12),
    "green": (0.15, 0.65, 0.2),
    "blue": (0.12, 0.25, 0.85),
    "yellow": (0.95, 0.85, 0.15),
    "orange": (0.95, 0.5, 0.1),
    "purple": (0.55, 0.2, 0.7),
    "white": (0.95, 0.95, 0.95),
    "gray": (0.5, 0.5, 0.5),
}
"""Albedo of each colour word."""

COLOR_ALIASES: dict[str, str] = {"grey": "gray"}
"""Spellings accepted for a palette colour."""

ARTICLES: tuple[str, ...] = ("a", "an", "the")
"""Words dropped before parsing."""

GRAMMAR = "'a <color> <shape>' or 'a <color> <shape> on a <color> <shape>', each <shape> optionally followed by a <motion>"

MOTIONS: tuple[str, ...] = ("bouncing", "spinning", "sliding left", "sliding right", "growing")
"""Motion phrases (see the module docstring for what each does over t in [0, 1])."""
BOUNCE_HEIGHT = 0.3
"""Peak lift of a bouncing part (world units), reached at t = 1/2."""
SLIDE_DISTANCE = 0.35
"""A sliding part moves from +-this to -+this along y."""
GROW_FROM = 0.6
"""Scale of a growing part at t = 0 (1 at t = 1)."""

_LIGHT_NORM = math.sqrt(1.0**2 + 0.3**2 + 0.8**2)
LIGHT_DIRECTION: tuple[float, float, float] = (1.0 / _LIGHT_NORM, 0.3 / _LIGHT_NORM, 0.8 / _LIGHT_NORM)
"""Unit direction towards the light, fixed in world space: from the front (+x), a little +y, above."""

AMBIENT = 0.3
"""Ambient term of the shading: shaded = albedo * (AMBIENT + DIFFUSE * max(0, n . l))."""
DIFFUSE = 0.7
"""Lambertian term of the shading."""

TARGET_RADIUS = 0.85
"""Every scene fits inside the ball of this radius around the origin."""

MARCH_STEPS = 64
"""Sphere-tracing iterations (fixed, so renders are deterministic)."""
HIT_EPSILON = 2e-3
"""A ray hits where the SDF falls below this distance."""
COMPACT_EVERY = 4
"""Drop converged and escaped rays from the march every this many steps (speed only)."""
NORMAL_STEP = 1e-3
"""Central-difference step of the SDF gradient (normals)."""
MESH_CHUNK_POINTS = 1 << 21
"""Grid points per SDF evaluation when meshing."""


# ------------------------------------------------------------------------------ primitives
# Primitives take coordinates as separate contiguous tensors x, y, z [...]: elementwise ops on
# them are several times faster than small reductions over a trailing axis of size 3.


def _sdf_sphere(x: Tensor, y: Tensor, z: Tensor, radius: float) -> Tensor:
    return torch.sqrt(x * x + y * y + z * z) - radius


def _sdf_box(x: Tensor, y: Tensor, z: Tensor, half_extent: float) -> Tensor:
    qx, qy, qz = x.abs() - half_extent, y.abs() - half_extent, z.abs() - half_extent
    outside = torch.sqrt(qx.clamp_min(0.0).square() + qy.clamp_min(0.0).square() + qz.clamp_min(0.0).square())
    inside = torch.maximum(qx, torch.maximum(qy, qz)).clamp_max(0.0)
    return outside + inside


def _sdf_torus(x: Tensor, y: Tensor, z: Tensor, major_radius: float, minor_radius: float) -> Tensor:
    """A ring lying in the xy plane (axis z)."""
    return torch.hypot(torch.hypot(x, y) - major_radius, z) - minor_radius


def _sdf_capped_cone(
    x: Tensor, y: Tensor, z: Tensor, half_height: float, bottom_radius: float, top_radius: float
) -> Tensor:
    """Exact SDF of a capped cone along z from ``-half_height`` to ``half_height`` (after Inigo Quilez)."""
    qx, qy = torch.hypot(x, y), z
    k1x, k1y = top_radius, half_height
    k2x, k2y = top_radius - bottom_radius, 2.0 * half_height
    cap_radius = torch.where(qy < 0.0, bottom_radius, top_radius)
    ca_x = qx - torch.minimum(qx, cap_radius)
    ca_y = qy.abs() - half_height
    along = (((k1x - qx) * k2x + (k1y - qy) * k2y) / (k2x * k2x + k2y * k2y)).clamp(0.0, 1.0)
    cb_x = qx - k1x + k2x * along
    cb_y = qy - k1y + k2y * along
    distance = torch.sqrt(torch.minimum(ca_x * ca_x + ca_y * ca_y, cb_x * cb_x + cb_y * cb_y))
    return torch.where((cb_x < 0.0) & (ca_y < 0.0), -distance, distance)


def _sdf_cylinder(x: Tensor, y: Tensor, z: Tensor, radius: float, half_height: float) -> Tensor:
    dx = torch.hypot(x, y) - radius
    dy = z.abs() - half_height
    return torch.maximum(dx, dy).clamp_max(0.0) + torch.hypot(dx.clamp_min(0.0), dy.clamp_min(0.0))


def _sdf_capsule(x: Tensor, y: Tensor, z: Tensor, radius: float, half_segment: float) -> Tensor:
    """A vertical segment from ``-half_segment`` to ``half_segment`` on z, thickened by ``radius``."""
    return torch.sqrt(x * x + y * y + (z - z.clamp(-half_segment, half_segment)).square()) - radius


PrimitiveSDF = Callable[[Tensor, Tensor, Tensor, float], Tensor]
"""``sdf(x, y, z, scale)``: exact signed distance [...] of the primitive scaled by ``scale``."""


@dataclass(frozen=True)
class Primitive:
    """A shape at unit scale, centred on its bounding box."""

    sdf: PrimitiveSDF
    """Exact signed distance [...] at coordinates x, y, z [...] of the shape scaled by ``scale``."""
    half_extents: tuple[float, float, float]
    """Half sizes of the axis-aligned bounding box at unit scale."""
    radius: float
    """Radius of a ball around the centre that contains the shape at unit scale."""


PRIMITIVES: dict[str, Primitive] = {
    "sphere": Primitive(lambda x, y, z, s: _sdf_sphere(x, y, z, 0.6 * s), (0.6, 0.6, 0.6), 0.6),
    "cube": Primitive(lambda x, y, z, s: _sdf_box(x, y, z, 0.45 * s), (0.45, 0.45, 0.45), 0.45 * math.sqrt(3.0)),
    "torus": Primitive(lambda x, y, z, s: _sdf_torus(x, y, z, 0.5 * s, 0.2 * s), (0.7, 0.7, 0.2), 0.7),
    "cone": Primitive(
        lambda x, y, z, s: _sdf_capped_cone(x, y, z, 0.5 * s, 0.6 * s, 0.0), (0.6, 0.6, 0.5), math.hypot(0.6, 0.5)
    ),
    "cylinder": Primitive(
        lambda x, y, z, s: _sdf_cylinder(x, y, z, 0.45 * s, 0.5 * s), (0.45, 0.45, 0.5), math.hypot(0.45, 0.5)
    ),
    "capsule": Primitive(lambda x, y, z, s: _sdf_capsule(x, y, z, 0.35 * s, 0.35 * s), (0.35, 0.35, 0.7), 0.7),
}
"""Each shape word's primitive."""

SHAPES: tuple[str, ...] = tuple(PRIMITIVES)
"""Shape words: sphere, cube, torus, cone, cylinder, capsule."""


# ---------------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Part:
    """One coloured primitive, scaled and moved: ``sdf(p) = scale * primitive((p - center) / scale)``."""

    shape: str
    """A word of ``SHAPES``."""
    color: str
    """A key of ``PALETTE``."""
    center: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """World position of the primitive's bounding-box centre."""
    scale: float = 1.0
    """Uniform scale of the unit-size primitive."""
    spin_deg: float = 0.0
    """Rotation about the world x axis through ``center``, degrees (spinning motion)."""

    @property
    def primitive(self) -> Primitive:
        return PRIMITIVES[self.shape]

    def sdf(self, points: Tensor) -> Tensor:
        """Signed distance [...] of world points [..., 3]."""
        return self.sdf_xyz(*points.unbind(-1))

    def sdf_xyz(self, x: Tensor, y: Tensor, z: Tensor) -> Tensor:
        """Signed distance [...] at world coordinates x, y, z [...]."""
        cx, cy, cz = self.center
        # Python-level checks skip the translation ops for the usual on-axis parts.
        x = x - cx if cx else x
        y = y - cy if cy else y
        z = z - cz if cz else z
        if self.spin_deg:  # the inverse rotation about x takes world offsets to the part's frame
            c, s = math.cos(math.radians(self.spin_deg)), math.sin(math.radians(self.spin_deg))
            y, z = c * y + s * z, c * z - s * y
        return self.primitive.sdf(x, y, z, self.scale)

    def bounds(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """World axis-aligned bounding box (low corner, high corner); conservative when spun."""
        half = [self.scale * h for h in self.primitive.half_extents]
        if self.spin_deg:
            c, s = abs(math.cos(math.radians(self.spin_deg))), abs(math.sin(math.radians(self.spin_deg)))
            half = [half[0], c * half[1] + s * half[2], s * half[1] + c * half[2]]
        return (
            tuple(c - h for c, h in zip(self.center, half)),
            tuple(c + h for c, h in zip(self.center, half)),
        )

    def bounding_radius(self) -> float:
        """Radius of a ball around the world origin that contains the part."""
        return math.sqrt(sum(c * c for c in self.center)) + self.scale * self.primitive.radius


@dataclass(frozen=True)
class Scene:
    """The union of one or more coloured parts; the ground truth behind one prompt."""

    parts: tuple[Part, ...]
    """Parts, top first for stacks (their rest pose, t = 0 of a static prompt)."""
    prompt: str
    """Canonical prompt text, e.g. ``a red sphere on a blue cube``."""
    motions: tuple[str, ...] = ()
    """One motion phrase of ``MOTIONS`` or "" per part; empty = static."""

    @property
    def is_dynamic(self) -> bool:
        """Whether any part moves."""
        return any(self.motions)

    def at(self, time: float) -> "Scene":
        """The static scene at time ``time`` in [0, 1] (itself when nothing moves)."""
        if not self.is_dynamic:
            return self
        return Scene(tuple(move(part, motion, float(time)) for part, motion in zip(self.parts, self.motions)),
                     self.prompt)

    @property
    def slug(self) -> str:
        """A safe file-name fragment, e.g. ``red-sphere-on-blue-cube``."""
        words = [w for w in self.prompt.split() if w not in ARTICLES]
        return re.sub(r"[^a-z0-9]+", "-", "-".join(words)).strip("-")

    def part_sdfs(self, points: Tensor) -> Tensor:
        """Signed distance of each part, [..., P]."""
        x, y, z = points.unbind(-1)
        return torch.stack([part.sdf_xyz(x, y, z) for part in self.parts], dim=-1)

    def sdf(self, points: Tensor) -> Tensor:
        """Signed distance [...] of world points [..., 3] (the union: minimum over parts)."""
        return self.sdf_xyz(*points.unbind(-1))

    def sdf_xyz(self, x: Tensor, y: Tensor, z: Tensor) -> Tensor:
        """Signed distance [...] at world coordinates x, y, z [...]."""
        distance = self.parts[0].sdf_xyz(x, y, z)
        for part in self.parts[1:]:
            distance = torch.minimum(distance, part.sdf_xyz(x, y, z))
        return distance

    def albedo(self, points: Tensor) -> Tensor:
        """Colour [..., 3] of the part nearest to each point [..., 3]."""
        palette = torch.tensor([PALETTE[part.color] for part in self.parts], dtype=points.dtype, device=points.device)
        if len(self.parts) == 1:
            return palette[0].expand(*points.shape[:-1], 3).clone()
        return palette[self.part_sdfs(points).argmin(dim=-1)]

    def bounds(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """World axis-aligned bounding box (low corner, high corner)."""
        lows, highs = zip(*(part.bounds() for part in self.parts))
        return tuple(map(min, zip(*lows))), tuple(map(max, zip(*highs)))

    def bounding_radius(self) -> float:
        """Radius of a ball around the origin that contains the scene."""
        return max(part.bounding_radius() for part in self.parts)

    def normals(self, points: Tensor) -> Tensor:
        """Unit outward normals [..., 3]: the SDF gradient by central differences."""
        offsets = NORMAL_STEP * torch.eye(3, dtype=points.dtype, device=points.device)
        shifted = torch.cat([points.unsqueeze(-2) + offsets, points.unsqueeze(-2) - offsets], dim=-2)  # [..., 6, 3]
        distance = self.sdf(shifted)
        gradient = distance[..., :3] - distance[..., 3:]
        return gradient / gradient.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def shade(self, points: Tensor) -> Tensor:
        """Lit colour [..., 3] of surface points [..., 3]: albedo * (ambient + diffuse * max(0, n . l))."""
        light = torch.tensor(LIGHT_DIRECTION, dtype=points.dtype, device=points.device)
        lambert = (self.normals(points) * light).sum(dim=-1, keepdim=True).clamp_min(0.0)
        return (self.albedo(points) * (AMBIENT + DIFFUSE * lambert)).clamp(0.0, 1.0)

    def render(
        self,
        cameras: Cameras,
        supersample: int = 2,
        background: tuple[float, float, float] | Tensor = BACKGROUND,
        image: str = "rgb",
    ) -> tuple[Tensor, Tensor]:
        """The reference image of each camera: rgb [B, H, W, 3] in [0, 1] and coverage alpha [B, H, W, 1].

        Each pixel averages ``supersample``² rays on a regular sub-pixel grid (antialiasing);
        missed rays see ``background``. ``image="normal"`` draws the world-space normal map
        (n + 1) / 2 instead of the lit colour.
        """
        if image not in ("rgb", "normal"):
            raise ValueError(f"image must be rgb or normal, got {image!r}")
        if supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {supersample}")
        if self.is_dynamic:  # each camera sees the scene at its own time (one static render per time)
            times = cameras.times()
            unique = torch.unique(times)
            rgb = torch.empty(len(cameras), cameras.height, cameras.width, 3, device=cameras.device)
            alpha = torch.empty(len(cameras), cameras.height, cameras.width, 1, device=cameras.device)
            for time in unique.tolist():
                index = (times == time).nonzero().squeeze(1)
                rgb[index], alpha[index] = self.at(time).render(cameras[index], supersample, background, image)
            return rgb, alpha
        B, H, W, s = len(cameras), cameras.height, cameras.width, supersample
        origins, directions = cameras.with_resolution(W * s, H * s).rays()  # [B, sH, sW, 3]
        origins, directions = origins.reshape(-1, 3), directions.reshape(-1, 3)
        low, high = self.bounds()
        margin = 4.0 * HIT_EPSILON
        hit, depth = sphere_trace(
            self.sdf_xyz, origins, directions, tuple(x - margin for x in low), tuple(x + margin for x in high)
        )
        background = torch.as_tensor(background, dtype=origins.dtype, device=origins.device)
        colour = background.expand(origins.shape[0], 3).clone()
        hit_index = hit.nonzero().squeeze(1)
        points = origins[hit_index] + depth[hit_index, None] * directions[hit_index]
        colour[hit_index] = self.shade(points) if image == "rgb" else (self.normals(points) + 1.0) * 0.5
        # Average each s x s block of sub-pixel rays (colour and coverage together).
        samples = torch.cat([colour, hit.to(colour.dtype).unsqueeze(1)], dim=1).view(B, H * s, W * s, 4)
        pixels = F.avg_pool2d(samples.permute(0, 3, 1, 2), kernel_size=s).permute(0, 2, 3, 1)
        return pixels[..., :3].contiguous(), pixels[..., 3:].contiguous()

    def mesh(self, resolution: int = 128, padding: float = 0.05) -> trimesh.Trimesh:
        """Marching cubes of the SDF zero level set, in world coordinates, with vertex colours
        (a dynamic scene's at t = 0).

        ``resolution`` samples span the longest side of the bounding box (plus ``padding``);
        cells are cubes. Faces wind counter-clockwise seen from outside (positive volume).
        """
        if resolution < 3:
            raise ValueError(f"mesh resolution must be >= 3, got {resolution}")
        if self.is_dynamic:
            return self.at(0.0).mesh(resolution, padding)
        low, high = (np.asarray(corner) for corner in self.bounds())
        low, high = low - padding, high + padding
        spacing = float((high - low).max()) / (resolution - 1)
        counts = np.ceil((high - low) / spacing).astype(int) + 1
        axes = [torch.tensor(low[i] + spacing * np.arange(counts[i]), dtype=torch.float32) for i in range(3)]
        volume = np.empty(tuple(counts), dtype=np.float32)
        yz = torch.stack(torch.meshgrid(axes[1], axes[2], indexing="ij"), dim=-1)  # [Ny, Nz, 2]
        # A few x-slabs at a time keeps memory flat at high resolutions.
        slabs_per_chunk = max(1, MESH_CHUNK_POINTS // (yz.shape[0] * yz.shape[1]))
        with torch.no_grad():
            for start in range(0, len(axes[0]), slabs_per_chunk):
                xs = axes[0][start : start + slabs_per_chunk]
                x = xs.view(-1, 1, 1).expand(-1, *yz.shape[:-1])
                y, z = (c.unsqueeze(0).expand_as(x) for c in yz.unbind(-1))
                volume[start : start + len(xs)] = self.sdf_xyz(x, y, z).numpy()
        # skimage's default ("descent") winds faces counter-clockwise seen from the side of the
        # higher values, i.e. outward for an SDF (negative inside); tests check the volume sign.
        vertices, faces, _, _ = marching_cubes(volume, level=0.0, spacing=(spacing,) * 3, gradient_direction="descent")
        vertices = vertices + low
        with torch.no_grad():
            colours = self.albedo(torch.from_numpy(vertices).float()).numpy()
        rgba = np.concatenate([colours, np.ones_like(colours[:, :1])], axis=1)
        return trimesh.Trimesh(
            vertices=vertices, faces=faces, vertex_colors=(255 * rgba).round().astype(np.uint8), process=False
        )


SDFxyz = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``sdf(x, y, z)``: signed distance [...] at coordinates x, y, z [...]."""


def sphere_trace(
    sdf: SDFxyz,
    origins: Tensor,
    directions: Tensor,
    box_low: tuple[float, ...],
    box_high: tuple[float, ...],
    steps: int = MARCH_STEPS,
    hit_epsilon: float = HIT_EPSILON,
) -> tuple[Tensor, Tensor]:
    """March N rays through an SDF for a fixed number of steps.

    Args:
        sdf: signed distance [M] at coordinates x, y, z [M].
        origins: ray origins [N, 3], outside the box.
        directions: unit ray directions [N, 3].
        box_low, box_high: corners of an axis-aligned box that contains the surface; rays start
            where they enter it and are abandoned where they leave it.
        steps: march iterations (fixed: the result does not depend on timing or batch layout).
        hit_epsilon: a ray hits where the SDF falls below this.

    Returns:
        hit [N] (bool) and depth [N] along the ray (``inf`` where missed).
    """
    N = origins.shape[0]
    low = torch.tensor(box_low, dtype=origins.dtype, device=origins.device)
    high = torch.tensor(box_high, dtype=origins.dtype, device=origins.device)
    # Slab test; a zero direction component gives +-inf, which min/max handle.
    inverse = 1.0 / directions
    t_low, t_high = (low - origins) * inverse, (high - origins) * inverse
    t_near = torch.minimum(t_low, t_high).amax(dim=-1).clamp_min(0.0)
    t_far = torch.maximum(t_low, t_high).amin(dim=-1)
    hit = torch.zeros(N, dtype=torch.bool, device=origins.device)
    depth = torch.full((N,), math.inf, dtype=origins.dtype, device=origins.device)
    index = (t_near < t_far).nonzero().squeeze(1)
    # The live rays' state as rows [8, M] (origin xyz, direction xyz, t, t_exit): one gather
    # compacts it, and each row is contiguous for the SDF's elementwise ops.
    state = torch.cat([origins.T, directions.T, t_near[None], t_far[None]]).index_select(1, index)
    for step in range(steps):
        if index.numel() == 0:
            break
        t = state[6]
        distance = sdf(*torch.addcmul(state[0:3], t, state[3:6]))
        last = step == steps - 1
        # Most rays finish within a few steps: compact often early, rarely later.
        if last or step < 8 or step % COMPACT_EVERY == COMPACT_EVERY - 1:
            converged = distance < hit_epsilon
            done = converged.nonzero().squeeze(1)
            hit[index[done]] = True
            depth[index[done]] = t[done]
            if last:
                break
            # Removing finished rays changes no ray's result, only the work per step.
            keep = (~converged & (t <= state[7])).nonzero().squeeze(1)
            index, state, distance = index[keep], state.index_select(1, keep), distance[keep]
        state[6] += distance
    return hit, depth


# --------------------------------------------------------------------------------- grammar


def vocabulary_message() -> str:
    """The grammar and the words it knows, for error messages."""
    return (
        f"grammar: {GRAMMAR}; vocabulary: shapes {', '.join(SHAPES)}; colors {', '.join(PALETTE)}"
        f"; motions {', '.join(MOTIONS)}; articles (a, an, the) and case are ignored"
    )


def _article(color: str) -> str:
    return "an" if color[0] in "aeiou" else "a"


def compose(parts: list[tuple[str, str]]) -> tuple[Part, ...]:
    """Parts for ``[(color, shape), ...]`` listed top first, stacked touching, centred, scaled to fit."""
    heights = [PRIMITIVES[shape].half_extents[2] for _, shape in parts]
    # Stack bottom-up at unit scale, then centre the whole stack's z-range at the origin.
    total_height = 2.0 * sum(heights)
    centers_z, floor = [], -0.5 * total_height
    for half_height in reversed(heights):
        centers_z.append(floor + half_height)
        floor += 2.0 * half_height
    centers_z.reverse()
    unit_parts = [Part(shape, color, (0.0, 0.0, z), 1.0) for (color, shape), z in zip(parts, centers_z)]
    scale = min(1.0, TARGET_RADIUS / max(part.bounding_radius() for part in unit_parts))
    return tuple(Part(p.shape, p.color, (0.0, 0.0, scale * p.center[2]), scale) for p in unit_parts)


def move(part: Part, motion: str, time: float) -> Part:
    """``part`` at time ``time`` in [0, 1] under ``motion`` (a phrase of ``MOTIONS``, or "" for none)."""
    cx, cy, cz = part.center
    if motion == "":
        return part
    if motion == "bouncing":
        return Part(part.shape, part.color, (cx, cy, cz + BOUNCE_HEIGHT * math.sin(math.pi * time)), part.scale)
    if motion == "spinning":
        return Part(part.shape, part.color, part.center, part.scale, 180.0 * time)
    if motion in ("sliding left", "sliding right"):
        sign = 1.0 if motion == "sliding left" else -1.0  # the front camera's left is -y
        return Part(part.shape, part.color, (cx, cy + sign * SLIDE_DISTANCE * (1.0 - 2.0 * time), cz), part.scale)
    if motion == "growing":
        return Part(part.shape, part.color, part.center, part.scale * (GROW_FROM + (1.0 - GROW_FROM) * time))
    raise ValueError(f"unknown motion {motion!r}; choose one of {', '.join(MOTIONS)}")


def _parse_parts(words: list[str]) -> list[tuple[str, str, str]] | None:
    """``[(color, shape, motion), ...]`` top first, or None when the words do not follow the grammar."""
    parts, i = [], 0
    while True:
        if i + 1 >= len(words) or words[i] not in PALETTE or words[i + 1] not in SHAPES:
            return None
        color, shape, i, motion = words[i], words[i + 1], i + 2, ""
        if i < len(words) and words[i] in ("bouncing", "spinning", "growing"):
            motion, i = words[i], i + 1
        elif i + 1 < len(words) and words[i] == "sliding" and words[i + 1] in ("left", "right"):
            motion, i = f"sliding {words[i + 1]}", i + 2
        parts.append((color, shape, motion))
        if i == len(words):
            return parts if len(parts) <= 2 else None
        if words[i] != "on":
            return None
        i += 1


def parse_prompt(text: str) -> Scene:
    """The scene a prompt names; ``ValueError`` naming any unknown word, with the vocabulary."""
    normalised = text.strip().lower().rstrip(".!?,;: \t\n")
    words = [word for word in normalised.split() if word not in ARTICLES]
    motion_words = {word for phrase in MOTIONS for word in phrase.split()}
    known = set(SHAPES) | set(PALETTE) | set(COLOR_ALIASES) | {"on"} | motion_words
    unknown = [word for word in words if word not in known]
    if unknown:
        listed = ", ".join(repr(word) for word in dict.fromkeys(unknown))
        plural = "s" if len(unknown) > 1 else ""
        raise ValueError(f"unknown word{plural} {listed} in prompt {text!r}; {vocabulary_message()}")
    words = [COLOR_ALIASES.get(word, word) for word in words]
    parsed = _parse_parts(words)
    if parsed is None:
        raise ValueError(f"cannot parse prompt {text!r}; {vocabulary_message()}")
    canonical = " on ".join(
        f"{_article(color)} {color} {shape}" + (f" {motion}" if motion else "") for color, shape, motion in parsed
    )
    motions = tuple(motion for _, _, motion in parsed)
    return Scene(parts=compose([(color, shape) for color, shape, _ in parsed]), prompt=canonical,
                 motions=motions if any(motions) else ())
