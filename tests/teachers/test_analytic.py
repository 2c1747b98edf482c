"""The analytic teacher: exact mixture scores, camera (un)awareness, CFG, latents, student."""

from __future__ import annotations

import math

import pytest
import torch
import trimesh

from lift3d.cameras import orbit_cameras
from lift3d.teachers.analytic import (
    AnalyticTeacher,
    AnalyticTeacherConfig,
    MixturePayload,
    mixture_eps,
    mixture_posterior_mean,
    mixture_responsibilities,
    spherical_camera_embedding,
)
from lift3d.teachers.base import Teacher
from lift3d.teachers.scenes import BACKGROUND, parse_prompt

PROMPT = "a red sphere on a blue cube"
FEW_UNCONDITIONAL = ("a green cube", "a yellow cone on a white cylinder")


def _cameras(azimuths_deg, elevation_deg=15.0, size=32):
    n = len(azimuths_deg)
    return orbit_cameras(
        torch.full((n,), elevation_deg), torch.tensor(azimuths_deg, dtype=torch.float32),
        torch.full((n,), 3.25), torch.full((n,), 40.0), size, size,
    )


def _teacher(**overrides) -> AnalyticTeacher:
    options = {"resolution": 32, "unconditional_prompts": FEW_UNCONDITIONAL, **overrides}
    return AnalyticTeacher(AnalyticTeacherConfig(**options))


def _alpha_sigma(teacher: Teacher, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    abar = teacher.alphas_cumprod[t].double()
    return abar.sqrt(), (1.0 - abar).sqrt()


# ------------------------------------------------------------------------ mixture algebra


def test_mixture_eps_single_component_is_the_gaussian_formula():
    generator = torch.Generator().manual_seed(0)
    x_t, mu = torch.randn(3, 2, 4, 4, generator=generator), torch.randn(3, 1, 2, 4, 4, generator=generator)
    alpha, sigma, sigma_data = torch.tensor([0.9, 0.5, 0.1]), torch.tensor([0.3, 0.8, 0.99]), 0.2
    eps = mixture_eps(x_t, alpha, sigma, mu, torch.zeros(3, 1), sigma_data)
    a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    expected = s * (x_t - a * mu[:, 0]) / (a**2 * sigma_data**2 + s**2)
    assert eps.dtype == x_t.dtype and torch.allclose(eps, expected, atol=1e-5)


def test_mixture_eps_is_minus_sigma_times_the_score_of_the_noised_mixture():
    generator = torch.Generator().manual_seed(1)
    B, K, shape, sigma_data = 4, 3, (2, 3, 3), 0.3
    means = 0.3 * torch.randn(B, K, *shape, generator=generator, dtype=torch.float64)
    log_weights = torch.log_softmax(torch.randn(B, K, generator=generator, dtype=torch.float64), dim=1)
    alpha = torch.tensor([0.95, 0.8, 0.6, 0.3], dtype=torch.float64)
    sigma = (1.0 - alpha**2).sqrt()
    x_t = alpha.view(-1, 1, 1, 1) * means[:, 0] + 0.5 * torch.randn(B, *shape, generator=generator, dtype=torch.float64)
    x_t.requires_grad_(True)
    variance = (alpha**2 * sigma_data**2 + sigma**2).view(-1, 1)
    D = math.prod(shape)
    residual = (x_t.unsqueeze(1) - alpha.view(-1, 1, 1, 1, 1) * means).flatten(2)
    log_density = torch.logsumexp(
        log_weights - residual.square().sum(-1) / (2 * variance) - 0.5 * D * torch.log(2 * math.pi * variance), dim=1
    )
    (score,) = torch.autograd.grad(log_density.sum(), x_t)
    eps = mixture_eps(x_t.detach(), alpha, sigma, means, log_weights, sigma_data)
    assert eps.dtype == torch.float64
    assert torch.allclose(eps, -sigma.view(-1, 1, 1, 1) * score, atol=1e-10)
    responsibilities = mixture_responsibilities(x_t.detach(), alpha, sigma, means, log_weights, sigma_data)
    assert (responsibilities.max(dim=1).values < 0.999).any()  # the test exercises real mixing


def test_mixture_padding_with_minus_inf_weight_is_ignored():
    generator = torch.Generator().manual_seed(2)
    x_t, mu = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 1, 3, 4, 4, generator=generator)
    garbage = torch.full_like(mu, float("nan"))
    padded = torch.cat([mu, garbage, 1e6 * torch.ones_like(mu)], dim=1)
    log_weights = torch.tensor([[0.0, -math.inf, -math.inf], [0.0, -math.inf, -math.inf]])
    args = (torch.tensor(0.7), torch.tensor(0.7**0.5))
    unpadded = mixture_eps(x_t, *args, mu, torch.zeros(2, 1), 0.1)
    assert torch.equal(mixture_eps(x_t, *args, padded, log_weights, 0.1), unpadded)
    assert torch.isfinite(mixture_posterior_mean(x_t, *args, padded, log_weights, 0.1)).all()


def test_mixture_responsibilities_stay_finite_in_high_dimension():
    # 3x64x64 dims with far-apart components: the likelihood ratios underflow any naive exp.
    generator = torch.Generator().manual_seed(3)
    means = torch.rand(1, 4, 3, 64, 64, generator=generator) * 2 - 1
    x_t = means[:, 2] + 0.01 * torch.randn(1, 3, 64, 64, generator=generator)
    responsibilities = mixture_responsibilities(x_t, 1.0, 0.01, means, torch.full((1, 4), -math.log(4)), 0.1)
    assert torch.isfinite(responsibilities).all()
    assert responsibilities[0, 2] == pytest.approx(1.0) and responsibilities.sum().item() == pytest.approx(1.0)


def test_posterior_mean_satisfies_tweedie():
    generator = torch.Generator().manual_seed(4)
    means = torch.randn(2, 3, 3, 5, 5, generator=generator, dtype=torch.float64)
    log_weights = torch.log(torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.4, 0.0]], dtype=torch.float64))
    x_t = torch.randn(2, 3, 5, 5, generator=generator, dtype=torch.float64)
    alpha, sigma = torch.tensor([0.8, 0.4], dtype=torch.float64), torch.tensor([0.6, 0.9165], dtype=torch.float64)
    eps = mixture_eps(x_t, alpha, sigma, means, log_weights, 0.5)
    posterior = mixture_posterior_mean(x_t, alpha, sigma, means, log_weights, 0.5)
    tweedie = (x_t - sigma.view(-1, 1, 1, 1) * eps) / alpha.view(-1, 1, 1, 1)
    assert torch.allclose(posterior, tweedie, atol=1e-12)


# ----------------------------------------------------------------------------- the teacher


def test_sds_gaussian_prior_oracle():
    """E_eps[eps_hat(alpha x0 + sigma eps) - eps] = alpha sigma (x0 - mu) / (alpha^2 sigma_d^2 + sigma^2)."""
    teacher = _teacher(resolution=8)
    cameras = _cameras([30.0, -100.0], size=8)
    conditioning = teacher.condition(teacher.encode_prompt(PROMPT), cameras)
    mu = conditioning.cond.means[:, 0]
    generator = torch.Generator().manual_seed(5)
    x0 = teacher.encode_images(torch.rand(2, 8, 8, 3, generator=generator))
    t = torch.tensor([200, 700])
    samples = 2048
    noise = torch.randn(samples, *x0.shape, generator=generator)
    noise = torch.cat([noise, -noise])  # antithetic pairs: the noise term cancels exactly
    x_t = teacher.add_noise(x0.expand_as(noise).flatten(0, 1), noise.flatten(0, 1), t.repeat(2 * samples))
    repeated = MixturePayload(
        conditioning.cond.means.repeat(2 * samples, 1, 1, 1, 1),
        conditioning.cond.log_weights.repeat(2 * samples, 1),
        conditioning.cond.component_names,
        conditioning.cond.sigma,
    )
    eps_hat = mixture_eps(x_t, *_alpha_sigma(teacher, t.repeat(2 * samples)), repeated.means, repeated.log_weights, 0.1)
    mean_residual = (eps_hat - noise.flatten(0, 1)).view(2 * samples, *x0.shape).mean(0)
    alpha, sigma = (v.float().view(-1, 1, 1, 1) for v in _alpha_sigma(teacher, t))
    expected = alpha * sigma * (x0 - mu) / (alpha**2 * 0.1**2 + sigma**2)
    assert torch.allclose(mean_residual, expected, atol=1e-4)
    # Plain Monte Carlo (no antithetic pairing) agrees within its standard error.
    plain = (eps_hat - noise.flatten(0, 1)).view(2 * samples, *x0.shape)[:samples]
    standard_error = plain.std(0) / samples**0.5
    assert ((plain.mean(0) - expected).abs() < 5 * standard_error + 1e-6).float().mean() > 0.999


def test_camera_aware_conditional_is_the_reference_render_at_the_true_camera():
    teacher = _teacher()
    cameras = _cameras([0.0, 170.0], size=48)  # any render size: references are at the teacher resolution
    state = teacher.encode_prompt(PROMPT)
    conditioning = teacher.condition(state, cameras)
    assert conditioning.view_labels == ["front", "back"]
    assert conditioning.cond.means.shape == (2, 1, 3, 32, 32)
    rgb, _ = parse_prompt(PROMPT).render(cameras.with_resolution(32, 32), supersample=2)
    assert torch.allclose(conditioning.cond.means[:, 0], 2 * rgb.permute(0, 3, 1, 2) - 1, atol=1e-6)
    assert conditioning.uncond.means.shape == (2, len(FEW_UNCONDITIONAL), 3, 32, 32)
    assert torch.allclose(conditioning.uncond.log_weights, torch.full((2, 2), -math.log(2)))


def test_camera_unaware_conditional_pulls_a_back_view_toward_the_canonical_mixture():
    teacher = _teacher(camera_aware=False)
    back = _cameras([180.0])
    side_reference = teacher.reference_images(parse_prompt(PROMPT), _cameras([90.0]))
    back_reference = teacher.reference_images(parse_prompt(PROMPT), back)
    t = torch.tensor([300])
    noise = torch.randn(side_reference.shape, generator=torch.Generator().manual_seed(6))
    x_t = teacher.add_noise(side_reference, noise, t)
    state = teacher.encode_prompt(PROMPT)

    # Without view-dependent prompts: 4 canonical components, and the teacher happily explains a
    # side view seen from the back camera (the Janus problem).
    janus = teacher.condition(state, back, view_dependent=False)
    assert janus.cond.means.shape == (1, 4, 3, 32, 32) and torch.isfinite(janus.cond.log_weights).all()
    assert janus.cond.component_names[1].endswith("@az90")
    alpha, sigma = _alpha_sigma(teacher, t)
    responsibilities = mixture_responsibilities(x_t, alpha, sigma, janus.cond.means, janus.cond.log_weights, 0.1)
    assert responsibilities[0, 1] > 0.999
    posterior = teacher.posterior_mean(x_t, t, janus.cond)
    assert (posterior - side_reference).norm() < 0.2 * (posterior - back_reference).norm()

    # "back view" narrows the mixture to the back component: the same x_t is pulled to the back render.
    narrowed = teacher.condition(state, back, view_dependent=True)
    assert narrowed.view_labels == ["back"]
    assert torch.isfinite(narrowed.cond.log_weights).tolist() == [[False, False, True, False]]
    assert torch.allclose(narrowed.cond.means[0, 2], back_reference, atol=1e-6)
    posterior = teacher.posterior_mean(x_t, t, narrowed.cond)
    assert (posterior - back_reference).norm() < 0.2 * (posterior - side_reference).norm()
    # The unconditional branch is never narrowed.
    assert torch.isfinite(narrowed.uncond.log_weights).all()
    assert narrowed.uncond.means.shape == (1, 4 * len(FEW_UNCONDITIONAL), 3, 32, 32)


def test_view_dependent_narrowing_per_label():
    teacher = _teacher(camera_aware=False)
    cameras = orbit_cameras(
        torch.tensor([10.0, 10.0, 10.0, 10.0, 75.0]), torch.tensor([20.0, 100.0, -80.0, 160.0, 180.0]),
        torch.full((5,), 3.25), torch.full((5,), 40.0), 32, 32,
    )
    conditioning = teacher.condition(teacher.encode_prompt("a blue torus"), cameras)
    assert conditioning.view_labels == ["front", "side", "side", "back", "overhead"]
    kept = torch.isfinite(conditioning.cond.log_weights)
    assert kept.tolist() == [
        [True, False, False, False],
        [False, True, False, True],
        [False, True, False, True],
        [False, False, True, False],
        [True, True, True, True],
    ]
    weights = conditioning.cond.log_weights.exp().sum(dim=1)
    assert torch.allclose(weights, torch.ones(5))


def test_cfg_with_distinct_payloads():
    teacher = _teacher()
    cameras = _cameras([45.0, -135.0])
    conditioning = teacher.condition(teacher.encode_prompt(PROMPT), cameras)
    x0 = teacher.encode_images(torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(7)))
    t = torch.tensor([100, 600])
    x_t = teacher.add_noise(x0, torch.randn_like(x0), t)
    prediction = teacher.predict_noise(x_t, t, conditioning)
    assert prediction.cond.shape == x_t.shape == prediction.uncond.shape
    assert not torch.allclose(prediction.cond, prediction.uncond)
    assert torch.allclose(prediction.cfg(1.0), prediction.cond, atol=1e-6)
    assert torch.allclose(prediction.cfg(0.0), prediction.uncond)


def test_negative_prompt_replaces_the_unconditional_set():
    teacher = _teacher()
    cameras = _cameras([10.0])
    state = teacher.encode_prompt(PROMPT, negative_prompt="a gray cube")
    conditioning = teacher.condition(state, cameras)
    assert conditioning.uncond.means.shape == (1, 1, 3, 32, 32)
    negative_reference = teacher.reference_images(parse_prompt("a gray cube"), cameras)
    assert torch.allclose(conditioning.uncond.means[:, 0], negative_reference)
    with pytest.raises(ValueError, match="negative prompt.*'ugly'"):
        teacher.encode_prompt(PROMPT, negative_prompt="ugly")
    with pytest.raises(ValueError, match="'photo'"):
        teacher.encode_prompt("a photo of a red sphere")
    # A negative prompt is a text condition (sigma_data); the empty prompt's mixture is broad.
    assert conditioning.uncond.sigma == teacher.config.sigma_data
    plain = teacher.condition(teacher.encode_prompt(PROMPT), cameras)
    assert plain.cond.sigma == teacher.config.sigma_data
    assert plain.uncond.sigma == teacher.config.unconditional_sigma > teacher.config.sigma_data


def test_broad_unconditional_gives_the_classifier_a_restoring_pull():
    """With sigma_u > sigma_data the implicit classifier eps(y) - eps(0), averaged over the noise,
    points back at the prompt's scene from either side of it; with sigma_u = sigma_data it pushes
    the same way on both sides (away from the other scenes), so it has no fixed point at the scene."""
    cameras = _cameras([10.0], size=8)
    t = torch.full((1,), 100)
    noise = torch.randn(1024, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    noise = torch.cat([noise, -noise])

    def mean_classifier(teacher: AnalyticTeacher, x0: torch.Tensor) -> torch.Tensor:
        state = teacher.encode_prompt("a red sphere")
        conditioning = teacher.condition(state, cameras)
        x_t = teacher.add_noise(x0.expand_as(noise), noise, t.expand(len(noise)))
        big = type(conditioning)(
            cond=conditioning.cond.__class__(conditioning.cond.means.expand(len(noise), -1, -1, -1, -1),
                                             conditioning.cond.log_weights.expand(len(noise), -1),
                                             conditioning.cond.component_names, conditioning.cond.sigma),
            uncond=conditioning.uncond.__class__(conditioning.uncond.means.expand(len(noise), -1, -1, -1, -1),
                                                 conditioning.uncond.log_weights.expand(len(noise), -1),
                                                 conditioning.uncond.component_names, conditioning.uncond.sigma),
            view_labels=None,
        )
        prediction = teacher.predict_noise(x_t, t.expand(len(noise)), big)
        return (prediction.cond - prediction.uncond).mean(0)

    for sigma_u, restoring in ((1.0, True), (0.1, False)):
        teacher = _teacher(unconditional_sigma=sigma_u)
        scene = teacher.condition(teacher.encode_prompt("a red sphere"), cameras).cond.means[:, 0]
        # eps points away from the data: a descent step x -= grad moves x against it.
        above = mean_classifier(teacher, scene + 0.05)
        below = mean_classifier(teacher, scene - 0.05)
        towards_scene = (above.mean() > 0) and (below.mean() < 0)
        assert bool(towards_scene) == restoring, sigma_u


def test_encode_images_resizes_by_area_exactly_like_the_supersampled_reference():
    teacher = _teacher(supersample=2)
    scene = parse_prompt(PROMPT)
    cameras = _cameras([0.0, 60.0], size=64)
    fine, _ = scene.render(cameras, supersample=1)  # 64 px = the reference's 2x2 sub-pixel rays at 32 px
    assert torch.allclose(teacher.encode_images(fine), teacher.reference_images(scene, cameras), atol=1e-5)
    rgb = torch.rand(2, 40, 40, 3, requires_grad=True)
    x0 = teacher.encode_images(rgb)
    assert x0.shape == (2, 3, 32, 32)
    x0.sum().backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    decoded = teacher.decode(teacher.encode_images(fine[:, ::2, ::2]))
    assert decoded.shape == (2, 32, 32, 3) and torch.allclose(decoded, fine[:, ::2, ::2], atol=1e-6)


def test_ground_truth_background_and_mesh():
    teacher = _teacher()
    state = teacher.encode_prompt("a purple capsule")
    cameras = _cameras([0.0, 90.0, 180.0], size=40)
    rgb = teacher.ground_truth(state, cameras)
    assert rgb.shape == (3, 40, 40, 3)
    assert torch.allclose(rgb[:, 0, 0], torch.tensor(BACKGROUND).expand(3, 3))
    assert torch.equal(teacher.background, torch.tensor(BACKGROUND))
    mesh = teacher.ground_truth_mesh(state, resolution=32)
    assert isinstance(mesh, trimesh.Trimesh) and mesh.volume > 0


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of 8"):
        AnalyticTeacher(AnalyticTeacherConfig(resolution=36, latent=True))
    with pytest.raises(ValueError, match="sigma_data"):
        AnalyticTeacher(AnalyticTeacherConfig(sigma_data=0.0))
    with pytest.raises(ValueError, match="unconditional_sigma"):
        AnalyticTeacher(AnalyticTeacherConfig(unconditional_sigma=-1.0))
    with pytest.raises(ValueError, match="'unicorn'"):
        AnalyticTeacher(AnalyticTeacherConfig(unconditional_prompts=("a pink unicorn",)))


def test_default_unconditional_set_covers_the_vocabulary():
    teacher = AnalyticTeacher()
    shapes = {part.shape for scene in teacher.unconditional_scenes for part in scene.parts}
    colours = {part.color for scene in teacher.unconditional_scenes for part in scene.parts}
    assert len(shapes) == 6 and len(colours) == 8
    assert teacher.channels == 3 and teacher.num_train_timesteps == 1000


# ---------------------------------------------------------------------------------- latent


def test_latent_variant_shapes_and_linearity():
    teacher = _teacher(latent=True)
    assert teacher.channels == 4 and teacher.sample_size == 4
    generator = torch.Generator().manual_seed(8)
    first, second = torch.rand(2, 2, 32, 32, 3, generator=generator)
    x0 = teacher.encode_images(first)
    assert x0.shape == (2, 4, 4, 4)
    assert teacher.decode(x0).shape == (2, 32, 32, 3)
    # Affine in rgb (x0 = E (2 rgb - 1)); linear in (2 rgb - 1).
    mixed = teacher.encode_images(0.3 * first + 0.7 * second)
    assert torch.allclose(mixed, 0.3 * x0 + 0.7 * teacher.encode_images(second), atol=1e-5)
    zero = teacher.encode_images(torch.full((1, 32, 32, 3), 0.5))
    assert torch.allclose(zero, torch.zeros_like(zero), atol=1e-6)
    # The decoder is a right inverse: encode(decode(z)) = z where decoding does not clip.
    assert torch.allclose(teacher.encode_images(teacher.decode(0.5 * x0)), 0.5 * x0, atol=1e-5)


def test_latent_round_trip_is_close_on_smooth_images():
    teacher = _teacher(latent=True)
    rows, cols = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    smooth = torch.stack([0.2 + 0.5 * rows, 0.7 - 0.4 * cols, 0.5 + 0.2 * (rows + cols) / 2], dim=-1).unsqueeze(0)
    round_trip = teacher.decode(teacher.encode_images(smooth))
    assert (round_trip - smooth).abs().mean() < 0.03
    blocky = smooth[:, ::8, ::8].repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)
    assert torch.allclose(teacher.decode(teacher.encode_images(blocky)), blocky, atol=1e-5)


def test_latent_teacher_references_live_in_latent_space():
    teacher = _teacher(latent=True)
    cameras = _cameras([0.0])
    conditioning = teacher.condition(teacher.encode_prompt(PROMPT), cameras)
    assert conditioning.cond.means.shape == (1, 1, 4, 4, 4)
    rgb, _ = parse_prompt(PROMPT).render(cameras, supersample=2)
    assert torch.allclose(conditioning.cond.means[:, 0], teacher.encode_images(rgb), atol=1e-6)
    x_t = torch.randn(1, 4, 4, 4)
    assert teacher.predict_noise(x_t, torch.tensor([500]), conditioning).cond.shape == x_t.shape
    # A 4-channel render (latent-NeRF style) is taken as latents.
    assert teacher.encode_images(torch.randn(1, 8, 8, 4)).shape == (1, 4, 4, 4)


# --------------------------------------------------------------------------------- student


def test_student_starts_at_the_teacher_and_trains():
    teacher = _teacher()
    cameras = _cameras([30.0, 200.0])
    conditioning = teacher.condition(teacher.encode_prompt(PROMPT), cameras)
    student = teacher.make_student()
    x_t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    t = torch.tensor([50, 800])
    expected = teacher.predict_noise(x_t, t, conditioning).cond
    camera = spherical_camera_embedding(cameras)
    assert camera.shape == (2, 4)
    assert torch.equal(student(x_t, t, conditioning), expected)
    assert torch.equal(student(x_t, t, conditioning, camera=camera), expected)

    parameters = list(student.parameters())
    assert parameters and all(p.requires_grad for p in parameters)
    assert not any(p.requires_grad for p in teacher.parameters())
    loss = (student(x_t, t, conditioning, camera=camera) - torch.randn_like(x_t)).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in parameters)
    assert student.conv_out.weight.grad.abs().sum() > 0
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    optimizer.step()
    assert not torch.equal(student(x_t, t, conditioning, camera=camera), expected)
    with pytest.raises(ValueError, match="camera embedding"):
        student(x_t, t, conditioning, camera=torch.zeros(2, 3))


def test_student_learns_a_render_unlike_the_teacher_at_high_noise():
    """VSD needs the student to model renders that differ from the teacher's scene where x_t is
    almost pure noise; the residual sees the teacher's posterior mean, so it can place structure."""
    torch.manual_seed(0)
    teacher = _teacher()
    cameras = _cameras([30.0], size=16)
    conditioning = teacher.condition(teacher.encode_prompt(PROMPT), cameras, with_unconditional=False)
    render = conditioning.cond.means[:, 0].flip(-1)  # a mirrored scene: "the current particle"
    student = teacher.make_student()
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    t = torch.full((64,), 900)
    cond = type(conditioning)(
        cond=conditioning.cond.__class__(conditioning.cond.means.expand(64, -1, -1, -1, -1),
                                         conditioning.cond.log_weights.expand(64, -1),
                                         conditioning.cond.component_names, conditioning.cond.sigma),
        uncond=None, view_labels=None,
    )

    def denoising_loss() -> torch.Tensor:
        noise = torch.randn(64, *render.shape[1:])
        x_t = teacher.add_noise(render.expand(64, -1, -1, -1), noise, t)
        return (student(x_t, t, cond) - noise).square().mean()

    with torch.no_grad():
        before = torch.stack([denoising_loss() for _ in range(8)]).mean()
    for _ in range(150):
        optimizer.zero_grad()
        denoising_loss().backward()
        optimizer.step()
    with torch.no_grad():
        after = torch.stack([denoising_loss() for _ in range(8)]).mean()
    # The teacher's own eps is biased towards the unmirrored scene; the student removes most of that bias.
    assert after < before - 0.5 * (before - 1.0), (float(before), float(after))


def test_normal_image_teacher_sees_unit_front_facing_normal_maps():
    """``image: normal`` (Fantasia3D's geometry prior): references are (n + 1) / 2 of the scene's
    surface: unit normals that face the camera, over the same background."""
    teacher = _teacher(image="normal", supersample=1)
    state = teacher.encode_prompt(PROMPT)
    cameras = _cameras([0.0, 120.0], size=32)
    normal_rgb = teacher.ground_truth(state, cameras)
    lit_rgb = _teacher(supersample=1).ground_truth(state, cameras)
    _, alpha = state.scene.render(cameras, 1)
    covered = alpha[..., 0] == 1.0
    normals = normal_rgb[covered] * 2.0 - 1.0
    assert torch.allclose(normals.norm(dim=-1), torch.ones(len(normals)), atol=1e-3)
    _, directions = cameras.rays()
    facing = (normals * directions[covered]).sum(-1)
    assert (facing < 0).float().mean() > 0.97  # towards the camera (central differences blur the box's edges)
    assert torch.allclose(normal_rgb[~covered], lit_rgb[~covered])  # same background
    assert not torch.allclose(normal_rgb[covered], lit_rgb[covered], atol=0.05)
    x0 = teacher.reference_images(state.scene, cameras)
    assert torch.allclose(x0, 2.0 * normal_rgb.permute(0, 3, 1, 2) - 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="teacher.image.*rgb, normal"):
        AnalyticTeacher(AnalyticTeacherConfig(image="depth"))
