"""Triangle rasterization benchmark: forward + backward of rasterize -> interpolate -> antialias,
every live tier on identical inputs, with the agreement against the reference.

Scene: a UV sphere of radius 1 with about F faces and random per-vertex colours, seen by an orbit
camera at distance 3 (fov 40 deg, OpenGL-style clip space with near 0.1 and far 10). The loss is
the antialiased image against a standard-normal upstream gradient; gradients go to the clip
positions and the colours. The edge topology is computed once outside the timed region, as a
training loop over a fixed mesh would. Sizes are ``WxH:F``.

    python benchmarks/bench_mesh_raster.py                 # writes benchmarks/results/mesh_raster.json
    python benchmarks/bench_mesh_raster.py --sizes 64x64:2000 --repeats 3

``cases()`` returns the cases in ``benchmarks/kernels.py``'s ``Case`` form, for folding in there.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

try:
    import lift3d  # noqa: F401
except ImportError:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for the shared helpers in kernels.py

from kernels import REFERENCE, Case, Result, compare_tiers, native_tiers, run_cli  # noqa: E402

from lift3d.cameras import orbit_cameras  # noqa: E402
from lift3d.kernels._backend import tier_available  # noqa: E402
from lift3d.kernels.mesh_raster import (  # noqa: E402
    ANTIALIAS_OP,
    INTERPOLATE_OP,
    RASTERIZE_OP,
    antialias,
    edge_topology,
    interpolate,
    rasterize,
)

logger = logging.getLogger("benchmarks.mesh_raster")

DEFAULT_SIZES = ["64x64:2000", "256x256:20000"]
NEAR, FAR = 0.1, 10.0


def parse_size(size: str) -> tuple[int, int, int]:
    """``WxH:F`` -> (W, H, F)."""
    resolution, faces = size.split(":")
    width, height = (int(v) for v in resolution.lower().split("x"))
    return width, height, int(faces)


def uv_sphere(face_count: int) -> tuple[Tensor, Tensor]:
    """Unit UV sphere with ``2 * segments * (rings - 1)`` ~= ``face_count`` faces: [V, 3], [F, 3] int32."""
    segments = max(3, round(math.sqrt(face_count / 2)))
    rings = max(2, round(face_count / (2 * segments)) + 1)
    theta = torch.arange(1, rings, dtype=torch.float64) * math.pi / rings  # interior latitudes
    phi = torch.arange(segments, dtype=torch.float64) * 2 * math.pi / segments
    ring_points = torch.stack(
        [
            torch.sin(theta)[:, None] * torch.cos(phi)[None, :],
            torch.sin(theta)[:, None] * torch.sin(phi)[None, :],
            torch.cos(theta)[:, None].expand(-1, segments),
        ],
        dim=-1,
    ).reshape(-1, 3)
    poles = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]], dtype=torch.float64)
    vertices = torch.cat([poles, ring_points])
    north, south = 0, 1

    def ring_vertex(ring: Tensor, segment: Tensor) -> Tensor:
        return 2 + ring * segments + segment % segments

    s = torch.arange(segments)
    faces = [torch.stack([torch.full_like(s, north), ring_vertex(torch.zeros_like(s), s),
                          ring_vertex(torch.zeros_like(s), s + 1)], dim=-1)]
    for ring in range(rings - 2):
        r = torch.full_like(s, ring)
        a, b = ring_vertex(r, s), ring_vertex(r, s + 1)
        c, d = ring_vertex(r + 1, s), ring_vertex(r + 1, s + 1)
        faces += [torch.stack([a, c, d], dim=-1), torch.stack([a, d, b], dim=-1)]
    last = torch.full_like(s, rings - 2)
    faces.append(torch.stack([torch.full_like(s, south), ring_vertex(last, s + 1), ring_vertex(last, s)], dim=-1))
    return vertices.float(), torch.cat(faces).to(torch.int32)


def clip_positions(vertices: Tensor, width: int, height: int) -> Tensor:
    """[1, V, 4] OpenGL-style clip coordinates of world points seen by the benchmark camera."""
    cameras = orbit_cameras(
        torch.tensor([20.0]), torch.tensor([30.0]), torch.tensor([3.0]), torch.tensor([40.0]), width, height
    )
    world_to_camera = cameras.world_to_camera()[0]
    camera = vertices @ world_to_camera[:3, :3].T + world_to_camera[:3, 3]  # OpenCV axes: z forward, y down
    focal_y = 1.0 / math.tan(0.5 * float(cameras.fovy[0]))
    focal_x = focal_y * height / width
    depth = camera[:, 2]
    a, b = (FAR + NEAR) / (FAR - NEAR), -2 * FAR * NEAR / (FAR - NEAR)
    # y flips (OpenCV down -> NDC up): the raster's row 0 is the bottom of the image.
    return torch.stack([focal_x * camera[:, 0], -focal_y * camera[:, 1], a * depth + b, depth], dim=-1).unsqueeze(0)


def bench_mesh_raster(size: str, args: argparse.Namespace) -> list[Result]:
    """Forward + backward of rasterize -> interpolate -> antialias (size: ``WxH:F``)."""
    width, height, face_count = parse_size(size)
    device = torch.device(args.device)
    vertices, faces = uv_sphere(face_count)
    g = torch.Generator().manual_seed(0)
    positions = clip_positions(vertices, width, height).to(device)
    colors = torch.rand(vertices.shape[0], 3, generator=g).to(device)
    upstream = torch.randn(1, height, width, 3, generator=g).to(device)
    faces = faces.to(device)
    topology = edge_topology(faces)

    def make_run(tier: str) -> Callable[[], list[Tensor]]:
        def run() -> list[Tensor]:
            leaves = [positions.clone().requires_grad_(True), colors.clone().requires_grad_(True)]
            raster = rasterize(leaves[0], faces, (height, width), tier=tier)
            shaded = interpolate(leaves[1], raster, faces, tier=tier)
            image = antialias(shaded, raster, leaves[0], faces, topology=topology, tier=tier)
            grads = torch.autograd.grad((image * upstream).sum(), leaves)
            return [image.detach(), *grads]

        return run

    ops = (RASTERIZE_OP, INTERPOLATE_OP, ANTIALIAS_OP)
    tiers = [REFERENCE] + [t for t in native_tiers(device) if all(tier_available(t, op) for op in ops)]
    with torch.no_grad():
        coverage = float((rasterize(positions, faces, (height, width), tier=tiers[-1]).triangle_id >= 0).float().mean())
    notes: dict[str, float | int | str] = {
        "faces": int(faces.shape[0]),
        "vertices": int(vertices.shape[0]),
        "coverage": round(coverage, 3),
        "threads": torch.get_num_threads(),
    }
    return compare_tiers("mesh_raster", size, tiers, make_run, args.repeats, device, notes, args.clock)


def cases() -> list[Case]:
    """The mesh-rasterization benchmark case for ``benchmarks/kernels.py``'s ``CASES``."""
    return [Case("mesh_raster", bench_mesh_raster, list(DEFAULT_SIZES))]


def main(argv: list[str] | None = None) -> list[Result]:
    return run_cli(cases(), argv, __doc__, Path("benchmarks/results/mesh_raster.json"), repeats_default=5)


if __name__ == "__main__":
    main()
