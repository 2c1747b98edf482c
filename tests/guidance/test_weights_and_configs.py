"""Extended weightings and the method presets in configs/."""

from pathlib import Path

import pytest
import torch

from lift3d.config import load_config, registered_name
from lift3d.guidance.common import weighting
from lift3d.guidance.weights import extended_weighting, weight_like

ROOT = Path(__file__).resolve().parents[2]


def test_extended_weightings():
    abar = torch.tensor([0.25, 0.81])
    for kind in ("sds", "uniform", "fantasia3d"):
        assert torch.equal(extended_weighting(kind, abar), weighting(kind, abar))
    assert torch.allclose(extended_weighting("ism", abar), torch.tensor([3.0**0.5, (0.19 / 0.81) ** 0.5]))
    assert torch.allclose(extended_weighting("sqrt_abar", abar), torch.tensor([0.5, 0.9]))
    with pytest.raises(ValueError, match="choose one of"):
        extended_weighting("bogus", abar)
    w = weight_like("ism", torch.tensor([0.5, 0.25]), torch.tensor([1, 0]), torch.zeros(2, 3, 4, 4))
    assert w.shape == (2, 1, 1, 1) and torch.allclose(w.flatten(), torch.tensor([3.0**0.5, 1.0]))


@pytest.mark.parametrize(
    "config, guidance, representation",
    [
        ("prolificdreamer.yaml", "vsd", "nerf"),
        ("esd.yaml", "esd", "nerf"),
        ("luciddreamer.yaml", "ism", "gaussians"),
        ("scaledreamer-asd.yaml", "asd", "nerf"),
        ("placiddreamer-bsd.yaml", "bsd", "gaussians"),
        ("dreamcraft3d-bootstrap.yaml", "bootstrap", "nerf"),
        ("dreamerxl-tsm.yaml", "tsm", "gaussians"),
        ("csd.yaml", "csd", "nerf"),
        ("analytic-vsd.yaml", "vsd", "gaussians"),
        ("analytic-esd.yaml", "esd", "gaussians"),
        ("analytic-ism.yaml", "ism", "gaussians"),
        ("analytic-asd.yaml", "asd", "gaussians"),
    ],
)
def test_method_presets_load(config, guidance, representation):
    loaded = load_config(ROOT / "configs" / config)
    assert registered_name("guidance", loaded.guidance) == guidance
    assert registered_name("representation", loaded.representation) == representation
