"""DMTet: projection, rendering with gradients to the SDF and deformation, regularisers, export, NeRF init."""

import pytest
import torch

from lift3d.cameras import orbit_cameras
from lift3d.config import Schedule
from lift3d.kernels.hashgrid import HashGridConfig
from lift3d.render.mesh import clip_positions
from lift3d.geometry.meshes import adjacent_face_pairs
from lift3d.representations.dmtet import DMTet, DMTetConfig

TINY = {"grid_resolution": 16, "kernel_tier": "reference", "encoding": HashGridConfig(n_levels=4, log2_hashmap_size=12),
        "hidden_dim": 16}


def _cams(batch=2, size=24):
    return orbit_cameras(torch.full((batch,), 15.0), torch.linspace(0, 90, batch), torch.full((batch,), 3.0),
                         torch.full((batch,), 40.0), size, size)


def test_clip_positions_agree_with_the_cameras_rays():
    """A point on the ray through pixel (i, j) lands in that pixel of the raster (row 0 = top)."""
    cameras = _cams(1, size=32)
    origins, dirs = cameras.rays()
    i, j = 21, 6  # column, row (top-down)
    point = origins[0, j, i] + 2.7 * dirs[0, j, i]
    clip = clip_positions(point.view(1, 3), cameras, 0.1, 100.0)[0, 0]
    ndc = clip[:2] / clip[3]
    column = (ndc[0] + 1) / 2 * cameras.width - 0.5
    row = (ndc[1] + 1) / 2 * cameras.height - 0.5
    assert torch.allclose(torch.stack([column, row]), torch.tensor([float(i), float(j)]), atol=1e-4)
    assert -1 < float(clip[2] / clip[3]) < 1


def test_render_gives_a_sphere_and_gradients_to_sdf_deformation_and_colour():
    model = DMTet(DMTetConfig(init_radius=0.6, **TINY), generator=torch.Generator().manual_seed(0))
    out = model.render(_cams(), torch.tensor([0.0, 1.0, 0.0]))
    assert out.rgb.shape == (2, 24, 24, 3) and out.alpha.shape == (2, 24, 24, 1)
    assert out.alpha[:, 12, 12, 0].min() == 1.0 and out.alpha[:, 0, 0, 0].max() == 0.0
    assert torch.allclose(out.rgb[:, 0, 0], torch.tensor([0.0, 1.0, 0.0]).expand(2, 3))
    # A loss on the image edge's colour only reaches the geometry through the antialiased silhouette.
    target = torch.zeros_like(out.alpha)
    ((out.alpha - target) ** 2).sum().backward()
    assert model.sdf.grad.abs().sum() > 0 and model.deformation.grad.abs().sum() > 0
    model.zero_grad()
    out = model.render(_cams(), torch.ones(3))
    out.rgb.sum().backward()
    assert model.encoding.table.grad.abs().sum() > 0


def test_regularisers_and_face_pairs():
    faces = torch.tensor([[0, 1, 2], [2, 1, 3], [3, 4, 5]])
    assert adjacent_face_pairs(faces).sort(dim=-1).values.tolist() == [[0, 1]]
    model = DMTet(DMTetConfig(lambda_normal_consistency=Schedule(1.0), lambda_laplacian=Schedule(1.0), **TINY))
    out = model.render(_cams(1), torch.ones(3))
    losses = model.regularization(out, step=0)
    assert set(losses) == {"normal_consistency", "laplacian"}
    assert 0 < float(losses["normal_consistency"].detach()) < 0.5  # a sphere: neighbouring faces nearly agree
    sum(losses.values()).backward()
    assert model.sdf.grad.abs().sum() > 0


def test_surface_export_and_empty_surface():
    model = DMTet(DMTetConfig(init_radius=0.5, **TINY))
    mesh, colour_fn = model.surface()
    assert mesh.is_watertight and abs(mesh.bounding_sphere.primitive.radius - 0.5) < 0.05
    assert colour_fn(torch.zeros(4, 3)).shape == (4, 3)
    with torch.no_grad():
        model.sdf.fill_(1.0)  # nothing inside
    assert model.render(_cams(1), torch.ones(3)).alpha.sum() == 0
    with pytest.raises(ValueError, match="surface is empty"):
        model.surface()


def test_config_validation():
    with pytest.raises(ValueError, match="init_radius"):
        DMTetConfig(init_radius=1.5)
    with pytest.raises(ValueError, match="grid_resolution"):
        DMTetConfig(grid_resolution=1)
    with pytest.raises(FileNotFoundError, match="init_from"):
        DMTet(DMTetConfig(init_from="/nonexistent/run", **TINY))



def test_init_from_a_nerf_run_starts_at_its_density_surface(tmp_path):
    from lift3d.config import load_config
    from lift3d.train import Trainer

    config = load_config("configs/quickstart-nerf.yaml", [
        "representation.encoding.n_levels=4", "representation.encoding.log2_hashmap_size=12",
        "representation.hidden_dim=16", "representation.num_samples_per_ray=32", "trainer.steps=1",
        "trainer.cameras.width=8", "trainer.cameras.height=8", "trainer.resolution_milestones=[]",
        "trainer.eval.num_views=1", "trainer.eval.width=8", "trainer.eval.height=8", "teacher.resolution=16",
        "trainer.progress_bar=false", "export.formats=[]",
    ])
    Trainer(config, run_dir=tmp_path / "nerf").fit()
    model = DMTet(DMTetConfig(init_from=str(tmp_path / "nerf"), **TINY))
    mesh, _ = model.surface()
    assert mesh.is_watertight and 0.2 < float(abs(mesh.vertices).max()) < 0.9
    # The grid starts from the NeRF's density field, not from the default sphere.
    sphere = DMTet(DMTetConfig(**TINY))
    assert not torch.allclose(model.sdf, sphere.sdf)
    assert (model.sdf < 0).any() and (model.sdf > 0).any()


def test_normal_shading_renders_the_normal_map_and_moves_the_surface_everywhere():
    """Fantasia3D's geometry stage: the image is (n + 1) / 2, so a loss on interior pixels (not
    only the silhouette) reaches the SDF and the deformation; the latent phase renders
    [normal map, mask] as 4 channels over black, during training only."""
    model = DMTet(DMTetConfig(shading="normal", normal_latent_steps=2, **TINY))
    model.eval()
    out = model.render(_cams(), torch.ones(3))
    inside = out.alpha[..., 0] > 0.999
    normals = out.rgb[inside] * 2.0 - 1.0
    assert torch.allclose(normals.norm(dim=-1), torch.ones(len(normals)), atol=1e-4)
    assert torch.allclose(out.rgb[inside], (out.normal[inside] + 1.0) * 0.5)
    model.train()
    out = model.render(_cams(), torch.ones(3))
    assert out.rgb.shape[-1] == 4 and torch.equal(out.rgb[..., 3:], out.alpha)
    assert out.rgb[:, 0, 0].abs().max() == 0.0  # black background in the latent phase
    interior = torch.zeros_like(out.alpha)
    interior[:, 10:14, 10:14] = 1.0
    (out.rgb[..., :3] * interior).sum().backward()
    assert model.sdf.grad.abs().sum() > 0 and model.encoding.table.grad is None  # geometry only
    model.on_step(1, out, None)
    assert model.latent_phase() is False and model.render(_cams(), torch.ones(3)).rgb.shape[-1] == 3
    with pytest.raises(ValueError, match="shading must be one of color, normal"):
        DMTetConfig(shading="depth")
    with pytest.raises(ValueError, match="normal_latent_steps"):
        DMTetConfig(normal_latent_steps=5)


def test_sdf_field_starts_at_the_initial_sdf_and_learns_through_the_hash_grid():
    field_config = {**TINY, "sdf_encoding": HashGridConfig(n_levels=4, log2_hashmap_size=12), "sdf_hidden_dim": 16}
    grid = DMTet(DMTetConfig(**TINY))
    model = DMTet(DMTetConfig(sdf="field", shading="normal", **field_config))
    assert torch.equal(model.sdf_values(), grid.sdf_values())  # zero-initialised residual
    names = {group["name"] for group in model.param_groups()}
    assert {"sdf_encoding", "sdf_network", "deformation"} <= names and "sdf" not in names
    optimizer = torch.optim.Adam(model.param_groups())
    for _ in range(2):  # the first step moves only the zero last layer; the second reaches the table
        optimizer.zero_grad()
        out = model.render(_cams(), torch.ones(3))
        out.rgb[..., 0].mean().backward()
        optimizer.step()
    assert model.sdf_encoding.table.grad.abs().sum() > 0
    assert not torch.equal(model.sdf_values(), grid.sdf_values())
    assert "base_sdf" in model.state_dict()  # a NeRF-initialised SDF survives a checkpoint
    with pytest.raises(ValueError, match="sdf must be one of grid, field"):
        DMTetConfig(sdf="mlp")


def test_mesh_marches_only_the_crossing_cells_with_the_same_result():
    """``mesh()`` prunes to the cells the surface crosses; the mesh is the full march's, bit for bit."""
    from lift3d.geometry.tetrahedra import marching_tetrahedra

    model = DMTet(DMTetConfig(init_radius=0.55, **TINY))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.deformation.normal_(generator=g)
        model.sdf.add_(0.05 * torch.randn(model.sdf.shape, generator=g))
    surface, faces = model.mesh()
    full_surface, full_faces = marching_tetrahedra(model.deformed_vertices(), model.tets, model.sdf_values())
    assert torch.equal(surface, full_surface) and torch.equal(faces, full_faces)
