"""Imports every built-in component once so that it registers itself (see ``registry``)."""

import lift3d.guidance.sds  # noqa: F401
import lift3d.representations.gaussians  # noqa: F401
import lift3d.representations.nerf  # noqa: F401
import lift3d.teachers.analytic  # noqa: F401
