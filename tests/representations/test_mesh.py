"""Explicit textured meshes: UV texture (RGB and Latent-Paint), colour field, geometry tuning, export."""

import math

import numpy as np
import pytest
import torch
import trimesh

from lift3d.cameras import orbit_cameras
from lift3d.config import Schedule, load_config
from lift3d.export.gltf import write_textured_mesh
from lift3d.representations.mesh import TexturedMesh, TexturedMeshConfig
from lift3d.train import Trainer

SMALL = {"icosphere_subdivisions": 2, "texture_resolution": 16, "kernel_tier": "reference"}


def _cams(batch=2, size=16):
    return orbit_cameras(torch.full((batch,), 15.0), torch.linspace(0, 90, batch), torch.full((batch,), 3.0),
                         torch.full((batch,), 40.0), size, size)


def test_uv_texture_renders_and_trains():
    model = TexturedMesh(TexturedMeshConfig(**SMALL))
    out = model.render(_cams(), torch.tensor([0.0, 0.0, 1.0]))
    assert out.rgb.shape == (2, 16, 16, 3) and out.alpha[:, 8, 8, 0].min() == 1.0
    assert torch.allclose(out.rgb[:, 8, 8], torch.full((2, 3), 0.5))  # sigmoid(0) everywhere on the sphere
    assert torch.allclose(out.rgb[:, 0, 0], torch.tensor([0.0, 0.0, 1.0]).expand(2, 3))
    out.rgb.sum().backward()
    assert model.texture.grad.abs().sum() > 0 and [g["name"] for g in model.param_groups()] == ["texture"]


def test_latent_paint_renders_four_channels_over_a_latent_background():
    model = TexturedMesh(TexturedMeshConfig(latent=True, **SMALL))
    background = torch.tensor([1.0, 1.0, 1.0])
    out = model.render(_cams(), background)
    assert out.rgb.shape == (2, 16, 16, 4)
    corner = out.rgb[0, 0, 0]
    assert torch.allclose(corner @ model.adapter, 2 * background - 1, atol=1e-5)  # the adapter shows white there


def test_exported_texture_matches_what_the_renderer_samples(tmp_path):
    """Rows run top-down in the image, UVs bottom-up: a vertex's colour in training equals the colour a
    glTF viewer reads at its UV in the exported file."""
    model = TexturedMesh(TexturedMeshConfig(**SMALL))
    rows = torch.linspace(-2.0, 2.0, 16).view(1, 16, 1, 1).expand(1, 16, 16, 3)
    with torch.no_grad():
        model.texture.copy_(rows)
    vertices, faces, uvs, image = model.textured_surface()
    trained = model._texel_values(model.uvs).detach().numpy()  # [V', 3] what the renderer sees
    path = write_textured_mesh(tmp_path, vertices, faces, uvs, image, formats=["glb"])[0]
    loaded = trimesh.load(path, force="mesh")
    png = np.asarray(loaded.visual.material.baseColorTexture.convert("RGB"), dtype=np.float64) / 255.0
    v = loaded.visual.uv[:, 1]  # OpenGL convention, as trimesh returns it
    row = np.clip((1.0 - v) * 16 - 0.5, 0, 15)
    low = np.floor(row).astype(int)
    high = np.minimum(low + 1, 15)
    frac = row - low
    read = png[low, 0] * (1 - frac[:, None]) + png[high, 0] * frac[:, None]
    assert np.abs(read - trained).max() < 2.5 / 255


def test_geometry_tuning_regularisers_and_field_appearance():
    config = TexturedMeshConfig(appearance="field", optimize_geometry=True, lambda_laplacian=Schedule(1.0),
                                lambda_normal_consistency=Schedule(1.0), **SMALL)
    model = TexturedMesh(config)
    out = model.render(_cams(), torch.ones(3))
    losses = model.regularization(out, 0)
    assert set(losses) == {"laplacian", "normal_consistency"}
    (out.rgb.sum() + sum(losses.values())).backward()
    assert model.offsets.grad.abs().sum() > 0 and model.encoding.table.grad.abs().sum() > 0
    assert {g["name"] for g in model.param_groups()} == {"encoding", "network", "geometry"}
    with pytest.raises(ValueError, match="latent"):
        TexturedMeshConfig(appearance="field", latent=True)
    with pytest.raises(FileNotFoundError, match="representation.path"):
        TexturedMesh(TexturedMeshConfig(path="/nonexistent.obj"))


def test_mesh_run_on_the_analytic_teacher_exports_and_scores(tmp_path):
    preset = tmp_path / "mesh.yaml"
    preset.write_text("prompt: a red sphere\nrepresentation: {type: mesh, icosphere_subdivisions: 2, "
                      "texture_resolution: 32, scale: 0.6}\nteacher: {type: analytic}\n"
                      "guidance: {type: sds, guidance_scale: 1.0}\n")
    config = load_config(preset, [
        "trainer.steps=2", "trainer.cameras.width=16", "trainer.cameras.height=16",
        "trainer.eval.num_views=2", "trainer.eval.width=16", "trainer.eval.height=16", "teacher.resolution=16",
        "trainer.progress_bar=false", "export.formats=[glb]",
    ])
    result = Trainer(config, run_dir=tmp_path / "run").fit()
    assert math.isfinite(result.metrics["eval/psnr"]) and result.metrics["eval/chamfer"] > 0
    assert (tmp_path / "run" / "export" / "model.glb").is_file()
