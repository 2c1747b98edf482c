"""Moving analytic scenes and the clip / image teachers: closed-form oracles."""

import math

import pytest
import torch

from lift3d.cameras import orbit_cameras
from lift3d.metrics import time_margin_db, time_shifted
from lift3d.teachers.analytic import AnalyticTeacher, AnalyticTeacherConfig
from lift3d.teachers.scenes import BOUNCE_HEIGHT, SLIDE_DISTANCE, parse_prompt

MOVING = "a red sphere bouncing on a blue cube"
RES = 16


def _clip(azimuth: float, times: list[float], res: int = RES):
    n = len(times)
    return orbit_cameras(torch.full((n,), 15.0), torch.full((n,), azimuth), torch.full((n,), 3.2),
                         torch.full((n,), 40.0), res, res, torch.tensor(times), n)


def test_grammar_parses_motions_and_rest_pose_is_the_static_prompt():
    scene = parse_prompt("A red sphere Bouncing on a blue cube.")
    assert scene.prompt == MOVING and scene.motions == ("bouncing", "") and scene.is_dynamic
    static = parse_prompt("a red sphere on a blue cube")
    assert scene.at(0.0).parts == static.parts and not static.is_dynamic and static.at(0.7) is static
    top = scene.at(0.5).parts[0]
    assert top.center[2] == pytest.approx(static.parts[0].center[2] + BOUNCE_HEIGHT)
    assert scene.at(0.5).parts[1] == static.parts[1]  # the cube stays
    assert parse_prompt("a green cone sliding left").at(1.0).parts[0].center[1] == pytest.approx(-SLIDE_DISTANCE)
    assert parse_prompt("a yellow torus spinning").at(0.5).parts[0].spin_deg == pytest.approx(90.0)
    with pytest.raises(ValueError, match="motion"):
        parse_prompt("a red sphere sliding up")


def test_spinning_torus_sdf_is_the_rotated_sdf():
    part = parse_prompt("a yellow torus spinning").at(0.5).parts[0]  # 90 degrees about x: the ring stands in xz
    # The ring's centre line now passes through (0.5, 0, 0) and (0, 0, 0.5) but not (0, 0.5, 0).
    points = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.0, 0.5], [0.0, 0.5, 0.0]], dtype=torch.float64)
    distance = part.sdf(points)
    assert distance[0] == pytest.approx(-0.2, abs=1e-9) and distance[1] == pytest.approx(-0.2, abs=1e-9)
    assert distance[2] == pytest.approx(math.hypot(0.5, 0.5) - 0.2, abs=1e-9)


def test_sliding_left_moves_the_object_left_in_the_front_view():
    scene = parse_prompt("a green cone sliding left")
    cameras = _clip(0.0, [0.0, 1.0], res=32)
    _, alpha = scene.render(cameras, supersample=1)
    columns = torch.arange(32, dtype=torch.float32)
    centroid = [(alpha[i, ..., 0].sum(0) * columns).sum() / alpha[i].sum() for i in range(2)]
    assert centroid[1] < centroid[0] - 4  # from the right of the image to its left


def test_clip_teacher_scores_the_true_clip_exactly_and_penalises_a_reversed_one():
    teacher = AnalyticTeacher(AnalyticTeacherConfig(resolution=RES, frames_per_clip=4, supersample=1))
    assert teacher.frames_per_clip == 4
    state = teacher.encode_prompt(MOVING)
    cameras = _clip(30.0, [0.0, 0.25, 0.5, 0.75])  # not symmetric under reversal (the bounce is)
    conditioning = teacher.condition(state, cameras, with_unconditional=False)
    truth = teacher.encode_images(teacher.ground_truth(state, cameras))
    assert truth.shape == (1, 3, 4, RES, RES) and conditioning.cond.means.shape == (1, 1, 3, 4, RES, RES)
    assert torch.allclose(teacher.decode(truth), (truth.transpose(1, 2)[0].permute(0, 2, 3, 1) + 1) / 2)
    t = torch.tensor([400])
    abar = teacher.alphas_cumprod[t]
    alpha, sigma, sd = abar.sqrt(), (1 - abar).sqrt(), teacher.config.sigma_data
    noise = torch.randn_like(truth, generator=torch.Generator().manual_seed(0))
    errors = []
    for clip in (truth, truth.flip(2)):
        x_t = alpha * clip + sigma * noise
        eps = teacher.predict_noise(x_t, t, conditioning).cond
        oracle = sigma * (x_t - alpha * truth) / (alpha**2 * sd**2 + sigma**2)  # one Gaussian component
        assert torch.allclose(eps, oracle, atol=1e-5)
        errors.append(float((eps - noise).square().mean()))
    # SDS's residual eps - noise measures incoherence: the time-reversed clip is far off, every frame of
    # it being a true frame of the scene (which a per-frame teacher could not tell).
    assert errors[1] > 10 * errors[0]


def test_image_teacher_is_the_time_marginal_and_motion_blind():
    teacher = AnalyticTeacher(AnalyticTeacherConfig(resolution=RES, marginal_times=3, supersample=1))
    state = teacher.encode_prompt(MOVING)
    early = _clip(30.0, [0.1, 0.2])
    early = early.with_time(early.times())
    early.frames = 1
    late = early.with_time(torch.tensor([0.8, 0.9]))
    a = teacher.condition(state, early, with_unconditional=False).cond
    b = teacher.condition(state, late, with_unconditional=False).cond
    assert torch.equal(a.means, b.means) and a.means.shape[1] == 3  # the camera's time is not seen
    for k, time in enumerate((0.0, 0.5, 1.0)):
        reference = teacher.reference_images(state.scene, early.with_time(time))
        assert torch.equal(a.means[:, k], reference)
    # A static prompt keeps its single component (existing behaviour).
    static = teacher.condition(teacher.encode_prompt("a red sphere on a blue cube"), early, with_unconditional=False)
    assert static.cond.means.shape[1] == 1


def test_clip_teacher_rejects_single_frames_and_canonical_mixtures():
    teacher = AnalyticTeacher(AnalyticTeacherConfig(resolution=RES, frames_per_clip=4))
    with pytest.raises(ValueError, match="frames=1"):
        teacher.condition(teacher.encode_prompt(MOVING), _clip(0.0, [0.0, 0.5]).with_time(None)[0:1])
    with pytest.raises(ValueError, match="camera_aware"):
        AnalyticTeacher(AnalyticTeacherConfig(frames_per_clip=4, camera_aware=False))


def test_time_margin_is_zero_for_static_truth_and_high_for_the_truth_itself():
    times = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    assert torch.allclose(time_shifted(times), torch.tensor([0.5, 0.75, 1.0, 0.25, 0.5]))
    scene = parse_prompt(MOVING)
    cameras = _clip(45.0, times.tolist())
    truth, _ = scene.render(cameras, supersample=1)
    shifted, _ = scene.render(cameras.with_time(time_shifted(times)), supersample=1)
    assert time_margin_db(truth, truth, shifted) > 10.0
    static, _ = parse_prompt("a red sphere on a blue cube").render(cameras, supersample=1)
    assert time_margin_db(static, static, static) == 0.0
