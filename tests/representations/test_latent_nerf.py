"""Latent-NeRF: latent and refinement renders, the adapter, init_from, and the Sketch-Shape loss."""

import math

import pytest
import torch
import trimesh

from lift3d.cameras import orbit_cameras
from lift3d.checkpoint import save_checkpoint
from lift3d.config import load_config
from lift3d.kernels.hashgrid import HashGridConfig
from lift3d.representations.latent_nerf import (
    LATENT_TO_RGB,
    LatentNeRF,
    LatentNeRFConfig,
    SketchShape,
    SketchShapeConfig,
    distance_to_samples,
    winding_numbers,
)
from lift3d.representations.nerf import ShadingConfig
from lift3d.train import Trainer


def _cams(batch=2, size=16):
    return orbit_cameras(torch.full((batch,), 15.0), torch.linspace(0, 180, batch), torch.full((batch,), 3.0),
                         torch.full((batch,), 40.0), size, size)


def _model(**kwargs) -> LatentNeRF:
    config = LatentNeRFConfig(encoding=HashGridConfig(n_levels=4, log2_hashmap_size=12), hidden_dim=16,
                              num_samples_per_ray=64, **kwargs)
    return LatentNeRF(config, generator=torch.Generator().manual_seed(0))


def _box_file(tmp_path, extents=(1.0, 1.0, 1.0)):
    path = tmp_path / "box.obj"
    trimesh.creation.box(extents=extents).export(path)
    return path


def test_winding_numbers_and_distances_of_a_box():
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    triangles = torch.as_tensor(box.vertices[box.faces], dtype=torch.float32)
    points = torch.tensor([[0.0, 0.0, 0.0], [0.4, -0.3, 0.2], [0.9, 0.0, 0.0], [0.0, 0.0, -2.0]])
    winding = winding_numbers(points, triangles)
    assert torch.allclose(winding, torch.tensor([1.0, 1.0, 0.0, 0.0]), atol=1e-5)
    samples = torch.as_tensor(trimesh.sample.sample_surface(box, 20000, seed=0)[0], dtype=torch.float32)
    distance = distance_to_samples(points, samples)
    assert torch.allclose(distance, torch.tensor([0.5, 0.1, 0.4, 1.5]), atol=0.03)


def test_sketch_shape_loss_raises_density_inside_and_lowers_it_outside(tmp_path):
    sketch = SketchShape(SketchShapeConfig(mesh=str(_box_file(tmp_path)), scale=0.7, grid_resolution=24,
                                           surface_samples=4000, num_points=2048), radius=1.0)
    captured = {}

    def density_fn(points):
        captured["points"] = points
        captured["sigma"] = torch.full((len(points),), 2.0, requires_grad=True)
        return captured["sigma"]

    sketch.loss(density_fn, generator=torch.Generator().manual_seed(0)).backward()
    target, weight = sketch.lookup(captured["points"])
    grad = captured["sigma"].grad
    inside, outside = target == 1, target == 0
    assert inside.any() and outside.any()
    assert (grad[inside] <= 0).all() and (grad[outside] >= 0).all()  # descent: up inside, down outside
    assert grad[inside].min() < 0 and grad[outside].max() > 0
    # Points far from the surface weigh more than points on it (freedom near the sketch).
    assert weight.max() > 0.5 and weight.min() < 0.05
    # The box was scaled so its farthest vertex sits at 0.7 radius: its half-extent is 0.7 / sqrt(3).
    half = 0.7 / math.sqrt(3.0)
    probe = torch.tensor([[0.0, 0.0, 0.0], [half * 0.8, 0.0, 0.0], [half * 1.3, 0.0, 0.0]])
    assert sketch.lookup(probe)[0].tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(FileNotFoundError, match="sketch_shape.mesh"):
        SketchShape(SketchShapeConfig(mesh=str(tmp_path / "missing.obj")), radius=1.0)


def test_latent_render_refinement_adapter_and_init_from(tmp_path):
    latent = _model()
    out = latent.render(_cams(), torch.ones(3))
    assert out.rgb.shape == (2, 16, 16, 4)
    assert torch.allclose(latent.adapter.weight.T, torch.tensor(LATENT_TO_RGB))
    # The solid background in latent space is the adapter's exact preimage of the colour.
    colour = torch.tensor([[0.2, 0.7, 0.9]])
    assert torch.allclose(latent.adapter(latent.rgb_to_field(colour)), 2 * colour - 1, atol=1e-5)
    assert not any(group["name"] == "adapter" for group in latent.param_groups())

    save_checkpoint(tmp_path / "ckpt" / "last.pt", {"representation": latent.state_dict()})
    refined = _model(refinement=True, init_from=str(tmp_path))
    torch.testing.assert_close(refined.encoding.table, latent.encoding.table)
    out = refined.render(_cams(), torch.ones(3))
    assert out.rgb.shape == (2, 16, 16, 3)
    out.rgb.sum().backward()
    assert refined.adapter.weight.grad is not None and refined.adapter.weight.grad.abs().sum() > 0
    assert any(group["name"] == "adapter" for group in refined.param_groups())
    with pytest.raises(ValueError, match="albedo"):
        _model(shading=ShadingConfig(mode="diffuse"))


def test_latent_nerf_trains_on_the_latent_analytic_teacher(tmp_path):
    """A few steps end to end: the render is the teacher's latent x0, eval decodes it for PSNR."""
    config = load_config("configs/quickstart-nerf.yaml", [
        "representation.type=latent-nerf", "representation.encoding.n_levels=4",
        "representation.encoding.log2_hashmap_size=12", "representation.hidden_dim=16",
        "representation.num_samples_per_ray=64", "representation.background=solid",
        f"representation.sketch_shape.mesh={_box_file(tmp_path)}", "representation.sketch_shape.grid_resolution=16",
        "representation.sketch_shape.surface_samples=2000",
        "teacher.latent=true", "teacher.resolution=32", "trainer.steps=3", "trainer.cameras.width=4",
        "trainer.cameras.height=4", "trainer.resolution_milestones=[]", "trainer.eval.width=32",
        "trainer.eval.height=32", "trainer.eval.num_views=2", "trainer.progress_bar=false", "export.formats=[]",
    ])
    result = Trainer(config, run_dir=tmp_path / "run").fit()
    assert math.isfinite(result.metrics["eval/psnr"])
    logged = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "reg/sketch_shape" in logged
