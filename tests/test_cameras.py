import torch

from lift3d.cameras import OrbitSampler, OrbitSamplerConfig, TurntableConfig, orbit_cameras, turntable, view_labels


def test_camera_looks_at_origin_and_projects_it_to_the_principal_point():
    cams = orbit_cameras(torch.tensor([20.0, -5.0]), torch.tensor([30.0, 200.0]), torch.tensor([3.0, 2.0]),
                         torch.tensor([40.0, 60.0]), 32, 24)
    origin = torch.tensor([0.0, 0.0, 0.0, 1.0])
    in_camera = cams.world_to_camera() @ origin
    assert torch.allclose(in_camera[:, :2], torch.zeros(2, 2), atol=1e-5)
    assert torch.allclose(in_camera[:, 2], torch.tensor([3.0, 2.0]), atol=1e-5)
    projected = cams.intrinsics() @ in_camera[:, :3].unsqueeze(-1)
    pixel = projected[:, :2, 0] / projected[:, 2:, 0]
    assert torch.allclose(pixel, torch.tensor([[16.0, 12.0], [16.0, 12.0]]), atol=1e-4)


def test_front_camera_sits_on_positive_x_and_world_up_is_image_up():
    cams = orbit_cameras(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([3.0]), torch.tensor([40.0]), 8, 8)
    assert torch.allclose(cams.position, torch.tensor([[3.0, 0.0, 0.0]]), atol=1e-6)
    point_above = cams.world_to_camera()[0] @ torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert point_above[1] < 0  # OpenCV: y down, so above the origin means negative y


def test_rays_are_unit_and_centre_ray_hits_origin_direction():
    cams = orbit_cameras(torch.tensor([10.0]), torch.tensor([45.0]), torch.tensor([2.5]), torch.tensor([50.0]), 9, 9)
    origins, dirs = cams.rays()
    assert dirs.shape == (1, 9, 9, 3)
    assert torch.allclose(dirs.norm(dim=-1), torch.ones(1, 9, 9), atol=1e-5)
    centre = dirs[0, 4, 4]
    assert torch.allclose(centre, -origins[0, 4, 4] / origins[0, 4, 4].norm(), atol=1e-5)


def test_view_labels_follow_threestudio_order():
    labels = view_labels(torch.tensor([0.0, 0.0, 0.0, 0.0, 70.0]), torch.tensor([10.0, 90.0, 170.0, -179.0, 180.0]))
    assert labels == ["front", "side", "back", "back", "overhead"]


def test_orbit_sampler_is_reproducible_and_within_ranges():
    cfg = OrbitSamplerConfig(batch_size=6, elevation_range_deg=(0.0, 30.0), distance_range=(2.0, 2.5))
    a = OrbitSampler(cfg).sample(torch.Generator().manual_seed(3))
    b = OrbitSampler(cfg).sample(torch.Generator().manual_seed(3))
    assert torch.equal(a.c2w, b.c2w)
    assert (a.elevation_deg >= 0).all() and (a.elevation_deg <= 30).all()
    assert (a.distance >= 2.0).all() and (a.distance <= 2.5).all()
    # stratified azimuths: one per sixth of the circle
    sectors = torch.floor((a.azimuth_deg + 180.0) / 60.0).sort().values
    assert sectors.tolist() == [0, 1, 2, 3, 4, 5]


def test_turntable_is_evenly_spaced():
    cams = turntable(TurntableConfig(num_views=4, azimuth_offset_deg=10.0))
    assert torch.allclose(cams.azimuth_deg, torch.tensor([10.0, 100.0, -170.0, -80.0]))
