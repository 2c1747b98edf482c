"""A tiny amortized config (seconds on a CPU) shared by the amortized tests."""

from __future__ import annotations

import copy
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CORPUS = str(REPO / "prompts" / "analytic-pairs.json")

TINY_NERF = {
    "encoding": {"n_levels": 4, "n_features_per_level": 2, "log2_hashmap_size": 12, "base_resolution": 8,
                 "per_level_scale": 1.5},
    "hidden_dim": 16, "num_samples_per_ray": 32, "normals": "none", "mesh_resolution": 24,
    "occupancy": {"resolution": 8, "warmup_steps": 8, "update_every": 4},
}


def tiny_config(tmp_path: Path, generator: str = "hyper-ingp", **trainer) -> dict:
    """A raw amortized config mapping for ``load_amortized_config(None, data=...)``."""
    generator_section = {"type": generator, "nerf": copy.deepcopy(TINY_NERF)}
    if generator == "hyper-ingp":
        generator_section["hyper_hidden"] = 16
    elif generator == "triplane":
        generator_section.update(width=16, layers=1, heads=2, query_resolution=4, upsample=1, plane_channels=4,
                                 decoder_hidden=8)
    elif generator == "voxel-3dconv":
        generator_section.update(base_resolution=2, upsample=2, channels=8, volume_channels=4, decoder_hidden=8)
    return {
        "name": "tiny-amortized",
        "corpus": CORPUS,
        "generator": generator_section,
        "teacher": {"type": "analytic", "resolution": 16, "supersample": 1},
        "guidance": {"type": "sds", "guidance_scale": 1.0},
        "trainer": {
            "steps": 2, "prompts_per_step": 2, "threads": 1, "progress_bar": False, "log_every": 1,
            "cameras": {"batch_size": 1, "width": 16, "height": 16},
            "eval": {"num_views": 2, "width": 16, "height": 16}, "eval_prompts": 2, "chamfer_prompts": 1,
            "embedding_cache": str(tmp_path / "embeddings"), "checkpoint_every_minutes": 0.0,
            **trainer,
        },
        "export": {"formats": ["glb"], "texture_size": 32, "video_resolution": 16},
    }
