import torch

from lift3d.cameras import orbit_cameras
from lift3d.config import Schedule
from lift3d.kernels.hashgrid import HashGridConfig
from lift3d.representations.nerf import NeRF, NeRFConfig, ShadingConfig


def _cams(batch=2, size=16):
    return orbit_cameras(torch.full((batch,), 15.0), torch.linspace(0, 180, batch), torch.full((batch,), 3.0),
                         torch.full((batch,), 40.0), size, size)


def _model(**kwargs):
    config = NeRFConfig(encoding=HashGridConfig(n_levels=4, log2_hashmap_size=12), hidden_dim=16,
                        num_samples_per_ray=64, **kwargs)
    return NeRF(config, generator=torch.Generator().manual_seed(0))


def test_blob_init_renders_an_opaque_centre_over_the_background():
    model = _model()
    out = model.render(_cams(), torch.tensor([0.0, 1.0, 0.0]))
    assert out.rgb.shape == (2, 16, 16, 3) and out.alpha.shape == (2, 16, 16, 1)
    assert out.alpha[:, 8, 8, 0].min() > 0.9  # the Magic3D blob is dense at the centre
    assert out.alpha[:, 0, 0, 0].max() < 0.05  # corners miss it
    assert torch.allclose(out.rgb[:, 0, 0], torch.tensor([0.0, 1.0, 0.0]).expand(2, 3), atol=0.05)


def test_gradients_reach_table_and_network_with_regularisers_and_shading():
    model = _model(shading=ShadingConfig(mode="diffuse", textureless_probability=0.0),
                   lambda_orientation=Schedule(1.0), lambda_sparsity=Schedule(0.1), lambda_opaque=Schedule(0.1))
    out = model.render(_cams(), torch.ones(3))
    assert out.normal is not None and torch.isfinite(out.normal).all()
    losses = model.regularization(out, step=0)
    assert set(losses) == {"orientation", "sparsity", "opaque"}
    (out.rgb.sum() + sum(losses.values())).backward()
    assert model.encoding.table.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.network.parameters())


def test_occupancy_grid_and_progressive_levels_follow_the_steps():
    model = _model(progressive_start_levels=2, progressive_step_interval=1)
    assert model.encoding.active_levels == 2
    optimizer = torch.optim.Adam(model.param_groups())
    out = model.render(_cams(), torch.ones(3))
    model.on_step(0, out, optimizer)
    assert model.encoding.active_levels == 3
    occupied = model.grid.occupancy.float().mean()
    assert 0.0 < occupied < 1.0  # the blob is occupied, the corners are not


def test_surface_mesh_of_the_blob():
    model = _model(mesh_resolution=48)
    model.eval()
    mesh, color_fn = model.surface()
    radii = torch.from_numpy(mesh.vertices).norm(dim=-1)
    assert 0.3 < float(radii.mean()) < 0.8 and float(radii.std()) < 0.05
    colors = color_fn(torch.zeros(4, 3))
    assert colors.shape == (4, 3) and ((colors >= 0) & (colors <= 1)).all()
