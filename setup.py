"""lift3d: text-to-3D/4D by score distillation. Pure Python install; kernels JIT-build on first use."""

from setuptools import find_packages, setup

setup(
    name="lift3d",
    version="0.1.0",
    description="Text to 3D and 4D assets by score distillation: NeRF, Gaussians, meshes; SDS, VSD and friends.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lift3d", "lift3d.*"]) + ["lift3d._cuda_src"],
    # The kernel sources live in the top-level cuda/ folder; ship them inside the package so a
    # regular (non-editable) install can still JIT-build them.
    package_dir={"lift3d._cuda_src": "cuda"},
    package_data={
        "lift3d._cuda_src": ["*.cpp", "*.cu", "*.h", "*.cuh"],
        # `lift3d report`: the viewer script, the stylesheet and the vendored three.js modules.
        "lift3d": ["report_assets/*.*", "report_assets/three/*", "report_assets/three/addons/*/*.js"],
    },
    install_requires=[
        "torch>=2.1,<3",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "trimesh>=4.0",
        "scikit-image>=0.21",
        "scipy>=1.9",
        "xatlas>=0.0.9",
        "pillow>=9",
        "fast-simplification>=0.1.7",
        "imageio>=2.30",
        "imageio-ffmpeg>=0.4.9",
        "ninja>=1.11",
    ],
    extras_require={
        # The tests exercise the diffusers teachers on tiny random models, so they need them too.
        "test": ["pytest>=7.4", "pytest-timeout>=2.2", "diffusers>=0.27", "transformers>=4.38", "accelerate>=0.27", "peft>=0.10"],
        "diffusers": ["diffusers>=0.27", "transformers>=4.38", "accelerate>=0.27", "peft>=0.10"],
    },
    entry_points={"console_scripts": ["lift3d=lift3d.cli:main"]},
)
