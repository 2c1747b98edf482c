"""Generators: text embeddings -> fields rendered by the NeRF path; gradients reach the generator."""

from __future__ import annotations

import pytest
import torch

from amortized_tiny import tiny_config
from lift3d import registry
from lift3d.amortized.generators import GeneratedNeRF, build_generator
from lift3d.amortized.train import load_amortized_config
from lift3d.cameras import turntable, TurntableConfig
from lift3d.config import ConfigError
from lift3d.teachers.analytic import AnalyticTeacher, AnalyticTeacherConfig


def test_analytic_text_embedding_is_fixed_per_word_and_position():
    teacher = AnalyticTeacher(AnalyticTeacherConfig(embedding_dim=8))
    a, b, c = teacher.text_embedding(["a red sphere", "A red cube.", "a blue sphere on a red cube"])
    assert a.shape == (5, 8)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])  # same word, same slot
    assert torch.equal(a[2:], b[2:])  # padding
    # The same word in another slot differs by the position vectors only.
    words, positions, _ = teacher._token_tables()
    assert torch.allclose(c[4], words["cube"] + positions[4]) and torch.allclose(b[1], words["cube"] + positions[1])
    with pytest.raises(ValueError, match="vocabulary"):
        teacher.text_embedding(["a red dragon"])


@pytest.mark.parametrize("name", registry.choices("generator"))
def test_generator_fields_render_and_backpropagate(name, tmp_path):
    config = load_amortized_config(None, data=tiny_config(tmp_path, name))
    teacher = AnalyticTeacher(AnalyticTeacherConfig(embedding_dim=8))
    embeddings = teacher.text_embedding(["a red sphere", "a blue cube"])
    torch.manual_seed(0)
    generator = build_generator(config.generator, *embeddings.shape[1:])
    fields = generator(embeddings)
    assert len(fields) == 2
    cameras = turntable(TurntableConfig(num_views=1, width=8, height=8))
    renders = []
    for field in fields:
        rep = GeneratedNeRF(generator.nerf, field)
        rep.refresh_grid()
        renders.append(rep.render(cameras, teacher.background).rgb)
    assert renders[0].shape == (1, 8, 8, 3)
    assert not torch.allclose(renders[0], renders[1])  # the text changes the object
    sum(r.sum() for r in renders).backward()
    grads = [p.grad for p in generator.parameters() if p.requires_grad]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) >= len(grads) // 2
    # Materialized: the same field as trainable parameters, detached from the generator.
    made = generator.representation(embeddings[0])
    points = torch.rand(64, 3) - 0.5
    with torch.no_grad():
        expected = GeneratedNeRF(generator.nerf, generator(embeddings[:1])[0]).density(points)
        torch.testing.assert_close(made.density(points), expected)
    assert all(p.is_leaf and p.requires_grad for p in made.parameters())
    assert sum(p.numel() for group in made.param_groups() for p in group["params"]) == sum(
        p.numel() for p in made.parameters())


def test_unknown_generator_type_lists_choices(tmp_path):
    data = tiny_config(tmp_path)
    data["generator"]["type"] = "hyper-ngp"
    with pytest.raises(ConfigError, match="hyper-ingp"):
        load_amortized_config(None, data=data)
    data = tiny_config(tmp_path)
    data["generator"]["hyper_widht"] = 3
    with pytest.raises(ConfigError, match="hyper_hidden"):
        load_amortized_config(None, data=data)
