"""PBR materials on the explicit mesh (Fantasia3D's appearance stage): shading, gradients, training,
``init_from`` another run's surface, and the tiny Stable Diffusion model."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from lift3d.cameras import orbit_cameras
from lift3d.config import load_config
from lift3d.render.pbr import EnvironmentLightConfig
from lift3d.representations.mesh import PBRMaterialConfig, TexturedMesh, TexturedMeshConfig
from lift3d.train import Trainer, build_representation, run

ROOT = Path(__file__).resolve().parents[2]
LIGHT = EnvironmentLightConfig(base_resolution=32, min_resolution=4, samples=16)
SMALL = {"icosphere_subdivisions": 3, "appearance": "field", "material": "pbr", "kernel_tier": "reference"}
SMALL_OVERRIDES = ["representation.pbr.light.base_resolution=32", "representation.pbr.light.min_resolution=4",
                   "representation.pbr.light.samples=16", "representation.encoding.n_levels=4",
                   "representation.encoding.log2_hashmap_size=12", "representation.hidden_dim=16",
                   "representation.kernel_tier=reference"]


def _model(bump: bool = False, **pbr) -> TexturedMesh:
    pbr = {"albedo_range": (0.0, 1.0), "roughness_range": (0.0, 1.0), "metallic_range": (0.0, 1.0), **pbr}
    return TexturedMesh(TexturedMeshConfig(pbr=PBRMaterialConfig(bump=bump, light=LIGHT, **pbr), **SMALL))


def _force(model: TexturedMesh, albedo, roughness: float, metallic: float) -> None:
    """Make the material field constant: zero last-layer weights, biases = logits of the wanted values."""
    cfg = model.config.pbr
    wanted = [*albedo, roughness, metallic]
    ranges = [cfg.albedo_range] * 3 + [cfg.roughness_range, cfg.metallic_range]
    unit = torch.tensor([(v - lo) / (hi - lo) for v, (lo, hi) in zip(wanted, ranges)]).clamp(1e-4, 1 - 1e-4)
    last = model.network[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias[:5] = torch.logit(unit)


def _cams(batch: int = 2, size: int = 24):
    return orbit_cameras(torch.full((batch,), 20.0), torch.linspace(0, 180, batch), torch.full((batch,), 2.5),
                         torch.full((batch,), 40.0), size, size)


def test_pbr_render_sends_gradients_to_albedo_roughness_metallic_and_bump():
    model = _model(bump=True)
    assert model.network[-1].out_features == 7
    out = model.render(_cams(), torch.ones(3))
    covered = out.alpha[..., 0] > 0.99
    assert out.rgb.shape == (2, 24, 24, 3) and covered.sum() > 100
    assert (out.rgb >= 0).all() and (out.rgb <= 1).all()
    out.rgb.square().sum().backward()
    per_output = model.network[-1].weight.grad.abs().sum(dim=1)  # rows: albedo 3, roughness, metallic, bump 2
    assert (per_output > 0).all(), per_output
    assert model.encoding.table.grad.abs().sum() > 0
    assert {g["name"] for g in model.param_groups()} == {"encoding", "network"}


def _sphere_pixels(model: TexturedMesh) -> torch.Tensor:
    with torch.no_grad():
        out = model.render(_cams(batch=3, size=32), torch.ones(3))
    return out.rgb[out.alpha[..., 0] > 0.99]


def test_roughness_blurs_the_reflection_and_metal_tints_it():
    model = _model()
    _force(model, (0.9, 0.9, 0.9), roughness=0.05, metallic=1.0)
    smooth = _sphere_pixels(model)
    _force(model, (0.9, 0.9, 0.9), roughness=0.95, metallic=1.0)
    rough = _sphere_pixels(model)
    # A mirror shows sky, sun and ground in contrast; a rough metal blurs them to a near-uniform glow.
    assert smooth.mean(-1).std() > 1.5 * rough.mean(-1).std()
    assert smooth.max() > rough.max()

    _force(model, (0.9, 0.02, 0.02), roughness=0.3, metallic=1.0)
    metal = _sphere_pixels(model)
    _force(model, (0.9, 0.02, 0.02), roughness=0.3, metallic=0.0)
    dielectric = _sphere_pixels(model)
    # A red metal reflects red only; a red dielectric adds an uncoloured 4 % specular layer.
    assert metal[:, 1].mean() < 0.8 * dielectric[:, 1].mean()
    assert (metal[:, 1] / metal[:, 0].clamp_min(1e-3)).mean() < (dielectric[:, 1] / dielectric[:, 0]).mean()


def test_material_ranges_and_config_errors():
    model = _model(metallic_range=(0.0, 0.0), roughness_range=(0.08, 0.7))
    material = model.material(torch.rand(50, 3) - 0.5)
    assert torch.equal(material["metallic"], torch.zeros(50))  # Fantasia3D: metallic fixed at 0
    assert material["roughness"].min() >= 0.08 and material["roughness"].max() <= 0.7 and "bump" not in material
    with pytest.raises(ValueError, match="pbr needs appearance: field"):
        TexturedMeshConfig(material="pbr")
    with pytest.raises(ValueError, match="roughness_range"):
        PBRMaterialConfig(roughness_range=(0.9, 0.1))
    with pytest.raises(ValueError, match="mutually exclusive"):
        TexturedMeshConfig(path="a.obj", init_from="runs/x")
    with pytest.raises(FileNotFoundError, match="representation.init_from"):
        TexturedMesh(TexturedMeshConfig(init_from="/nonexistent/run", **SMALL))


def _analytic_config(tmp_path: Path, extra: list[str]):
    preset = tmp_path / "pbr.yaml"
    preset.write_text("prompt: a red sphere\nrepresentation: {type: mesh, appearance: field, material: pbr, "
                      "icosphere_subdivisions: 3, scale: 0.6, kernel_tier: reference}\nteacher: {type: analytic}\n"
                      "guidance: {type: sds, guidance_scale: 1.0}\n")
    return load_config(preset, [
        *SMALL_OVERRIDES, "trainer.cameras.width=16", "trainer.cameras.height=16", "trainer.cameras.batch_size=2",
        "trainer.eval.num_views=3", "trainer.eval.width=16", "trainer.eval.height=16", "teacher.resolution=16",
        "trainer.progress_bar=false", "trainer.log_every=1", *extra,
    ])


def test_training_on_the_analytic_teacher_improves_psnr_and_exports_a_pbr_glb(tmp_path):
    config = _analytic_config(tmp_path, ["trainer.steps=30", "representation.lr.network=0.01", "export.formats=[glb]",
                                         "export.texture_size=64"])
    trainer = Trainer(config, run_dir=tmp_path / "run")
    before = trainer.evaluate()["eval/psnr"]
    result = trainer.fit()
    after = result.metrics["eval/psnr"]
    assert after > before + 3.0, (before, after)  # measured: 14.6 -> 21 dB
    assert math.isfinite(result.metrics["eval/chamfer"])
    material = __import__("trimesh").load(tmp_path / "run" / "export" / "model.glb", force="mesh").visual.material
    assert material.metallicRoughnessTexture is not None and material.baseColorTexture is not None


def test_init_from_a_dmtet_run_takes_its_surface_as_the_geometry(tmp_path):
    from lift3d.checkpoint import load_run_representation

    preset = tmp_path / "dmtet.yaml"
    preset.write_text("prompt: a red sphere\nrepresentation: {type: dmtet, grid_resolution: 16, hidden_dim: 16, "
                      "kernel_tier: reference, encoding: {n_levels: 4, log2_hashmap_size: 12}}\n"
                      "teacher: {type: analytic, resolution: 16}\nguidance: {type: sds, guidance_scale: 1.0}\n")
    run(str(preset), [
        "trainer.steps=2", "trainer.cameras.width=16", "trainer.cameras.height=16", "trainer.cameras.batch_size=1",
        "trainer.eval.num_views=1", "trainer.eval.width=16", "trainer.eval.height=16", "trainer.progress_bar=false",
        "export.formats=[]",
    ], out=str(tmp_path / "dmtet"))
    expected, _ = load_run_representation(tmp_path / "dmtet").surface()
    model = TexturedMesh(TexturedMeshConfig(init_from=str(tmp_path / "dmtet"), pbr=PBRMaterialConfig(light=LIGHT),
                                            **{k: v for k, v in SMALL.items() if k != "icosphere_subdivisions"}))
    assert model.base_vertices.shape == (len(expected.vertices), 3) and len(model.faces) == len(expected.faces)
    # Kept in the source run's world frame (no re-centring or scaling), unlike a mesh file.
    assert torch.allclose(model.base_vertices, torch.as_tensor(expected.vertices, dtype=torch.float32))
    sphere = TexturedMesh(TexturedMeshConfig(**SMALL))
    assert len(model.faces) != len(sphere.faces)
    # The checkpoint file works as well as the run folder.
    again = TexturedMesh(TexturedMeshConfig(init_from=str(tmp_path / "dmtet" / "ckpt" / "last.pt"),
                                            appearance="field", kernel_tier="reference"))
    assert torch.equal(again.base_vertices, model.base_vertices)


def test_fantasia3d_pipeline_runs_geometry_then_appearance_on_the_tiny_sd_model(tmp_path):
    """configs/fantasia3d.yaml end to end: the geometry stage trains the neural-SDF DMTet on
    [normal, mask] latents (step 1) and then VAE-encoded normal maps (step 2); the appearance stage
    puts a PBR material on that stage's mesh and exports a PBR GLB."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "tests" / "teachers"))
    from tiny_diffusers import save_tiny_sd

    from lift3d.cli import main

    model = save_tiny_sd(tmp_path / "tiny-sd")
    out = tmp_path / "run"
    geometry = ["geometry.representation.grid_resolution=16", "geometry.representation.normal_latent_steps=1",
                "geometry.representation.sdf_encoding.n_levels=4", "geometry.representation.sdf_encoding.log2_hashmap_size=12",
                "geometry.representation.sdf_hidden_dim=16", "geometry.representation.init_radius=0.7"]
    appearance = [f"appearance.{item}" for item in SMALL_OVERRIDES if "pbr" in item or "kernel_tier" in item]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is all overhead
    try:
        assert main([
            "run", str(ROOT / "configs" / "fantasia3d.yaml"), "--out", str(out), *geometry, *appearance,
            "representation.encoding.n_levels=4", "representation.encoding.log2_hashmap_size=12",
            "representation.hidden_dim=16", f"teacher.model={model}", "teacher.image_size=16",
            f"teacher.prompting.cache_dir={tmp_path / 'cache'}", "teacher.dtype=float32", "trainer.steps=2",
            "trainer.cameras.width=16", "trainer.cameras.height=16", "trainer.cameras.batch_size=1",
            "trainer.eval.width=16", "trainer.eval.height=16", "trainer.eval.num_views=2", "trainer.log_every=1",
            "trainer.progress_bar=false", "appearance.export.formats=[glb]", "export.texture_size=32",
        ]) == 0
    finally:
        torch.set_num_threads(threads)
    for stage in ("geometry", "appearance"):
        metrics = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)
    geometry_state = torch.load(out / "geometry" / "ckpt" / "last.pt", weights_only=True)["representation"]
    assert geometry_state["sdf_network.2.weight"].abs().sum() > 0  # the normal maps moved the SDF
    state = torch.load(out / "appearance" / "ckpt" / "last.pt", weights_only=True)["representation"]
    initial = build_representation(load_config(out / "appearance" / "config.yaml"), torch.device("cpu")).state_dict()
    assert not torch.equal(state["network.2.bias"], initial["network.2.bias"])  # the teacher moved the material
    material = __import__("trimesh").load(out / "appearance" / "export" / "model.glb", force="mesh").visual.material
    assert material.normalTexture is not None and material.metallicRoughnessTexture is not None
