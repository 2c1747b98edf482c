"""Imports every built-in component once so that it registers itself (see ``registry``)."""

import lift3d.guidance.asd  # noqa: F401
import lift3d.guidance.bootstrap  # noqa: F401
import lift3d.guidance.bsd  # noqa: F401
import lift3d.guidance.csm  # noqa: F401  (csd and csm)
import lift3d.guidance.hybrid  # noqa: F401
import lift3d.guidance.ism  # noqa: F401  (ism and tsm)
import lift3d.guidance.reconstruction  # noqa: F401
import lift3d.guidance.sds  # noqa: F401
import lift3d.guidance.vsd  # noqa: F401  (vsd and esd)
import lift3d.representations.dmtet  # noqa: F401
import lift3d.representations.dynamic  # noqa: F401  (dynamic-gaussians)
import lift3d.representations.dynamic_nerf  # noqa: F401
import lift3d.representations.gaussians  # noqa: F401
import lift3d.representations.latent_nerf  # noqa: F401
import lift3d.representations.mesh  # noqa: F401
import lift3d.representations.nerf  # noqa: F401
import lift3d.teachers.analytic  # noqa: F401
import lift3d.teachers.deepfloyd  # noqa: F401  (diffusers itself is imported only when built)
import lift3d.teachers.diffusers_sd  # noqa: F401
import lift3d.teachers.video  # noqa: F401
import lift3d.amortized.generate  # noqa: F401  (representation "generated": a NeRF from an amortized generator)
