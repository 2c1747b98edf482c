"""Textured mesh files: binary glTF (GLB, PBR metallic-roughness) and OBJ + MTL + PNG.

Axes. Our world is z-up (``lift3d.cameras``); glTF is y-up. Both writers map world
``(x, y, z)`` to file ``(x, z, -y)``, a -90 degree rotation about +x (proper rotation, so the
winding and handedness are unchanged). OBJ has no declared up axis; we write it in the same
y-up frame, which is what Blender's and most viewers' OBJ importers assume by default.

glTF says an asset's front faces +Z; ours faces +x (azimuth 0). With ``front_to_plus_z=True``
the writers also turn the asset -90 degrees about the up axis, i.e. world ``(x, y, z)`` ->
file ``(y, z, x)``, so viewers that open on the +Z side show the front.

Materials. ``base_color_texture`` is an sRGB uint8 image (stored as PNG), ``metallic`` and
``roughness`` are glTF's ``metallicFactor``/``roughnessFactor`` (perceptual roughness, not
alpha). Optional vertex colours go to ``COLOR_0`` (glTF multiplies them with the base colour).
We never call trimesh's ``material.pack()`` (it mis-packs metallic into R).

PBR materials (``export_textured_mesh`` with a :class:`lift3d.export.texture.PBRSurface`):
``baseColorTexture`` = sRGB-encoded albedo; ``metallicRoughnessTexture`` linear with G = roughness,
B = metallic and R = 1 (also referenced as ``occlusionTexture``, a no-op), factors 1.0;
``normalTexture`` tangent space relative to the ``TANGENT`` attribute written with it (UV
tangents, :func:`lift3d.export.texture.uv_tangents`), so viewers need not regenerate MikkTSpace
tangents. OBJ gets the threestudio-style MTL: ``map_Kd`` (sRGB albedo), ``map_Pr`` / ``map_Pm``
(greyscale roughness / metallic images) and ``norm`` (the normal map; OBJ carries no tangents, so
viewers use their own, e.g. MikkTSpace, which can differ slightly from ours).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from lift3d.export.ply import write_atomic
from lift3d.export.texture import ColorFn, PBRSurface, bake_pbr_textures, bake_texture, unwrap_uv

log = logging.getLogger(__name__)

Z_UP_TO_Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
"""World (z-up) to glTF (y-up): ``(x, y, z) -> (x, z, -y)``, -90 degrees about +x."""

FRONT_TO_PLUS_Z = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
"""World to glTF with the front (+x) turned to +Z: ``(x, y, z) -> (y, z, x)``."""


def world_to_file_rotation(front_to_plus_z: bool = False) -> np.ndarray:
    """The 3x3 rotation the writers apply to positions and normals (see the module docstring)."""
    return (FRONT_TO_PLUS_Z if front_to_plus_z else Z_UP_TO_Y_UP).copy()


def write_glb(
    path: Path | str,
    vertices: np.ndarray,
    faces: np.ndarray,
    uvs: np.ndarray | None = None,
    base_color_texture: np.ndarray | None = None,
    vertex_colors: np.ndarray | None = None,
    metallic: float = 0.0,
    roughness: float = 1.0,
    normals: np.ndarray | bool = True,
    front_to_plus_z: bool = False,
    metallic_roughness_texture: np.ndarray | None = None,
    normal_texture: np.ndarray | None = None,
    tangents: np.ndarray | None = None,
) -> Path:
    """Write one mesh with a PBR metallic-roughness material to a binary glTF file, atomically.

    Args:
        path: the ``.glb`` file.
        vertices: [V,3] world positions (z-up; converted to y-up, see the module docstring).
        faces: [F,3] vertex indices, counter-clockwise seen from outside.
        uvs: [V,2] in [0,1], lower-left origin (as :func:`lift3d.export.texture.unwrap_uv`
            returns them); required with a texture.
        base_color_texture: uint8 [H,W,3|4] sRGB image, or None for a plain base colour.
        vertex_colors: [V,3|4] in [0,1] (float) or 0..255 (uint8), written as ``COLOR_0``.
        metallic, roughness: ``metallicFactor`` / ``roughnessFactor`` (defaults: a rough
            dielectric, which is what an albedo-only bake looks right with).
        normals: True: smooth area-weighted vertex normals from the faces; False: none;
            an array [V,3]: these world-space normals.
        front_to_plus_z: also turn the front (+x) to glTF's +Z.
        metallic_roughness_texture: uint8 [H,W,3] LINEAR, glTF's packing: G = roughness,
            B = metallic (R = ambient occlusion, also written as ``occlusionTexture``). The
            factors then multiply it, so pass ``metallic=roughness=1.0`` to use it as it is.
        normal_texture: uint8 [H,W,3] tangent-space normals ``(n + 1) / 2`` (+Y up), linear.
        tangents: [V,4] world-space unit tangents and handedness w = +-1, written as ``TANGENT``
            (bitangent = w (normal x tangent)); the normal texture is relative to them.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    mesh = _file_mesh(vertices, faces, normals, front_to_plus_z)
    material = trimesh.visual.material.PBRMaterial(
        name="material_0",
        baseColorFactor=[1.0, 1.0, 1.0, 1.0],
        metallicFactor=float(metallic),  # trimesh writes factors only when they are Python floats
        roughnessFactor=float(roughness),
        baseColorTexture=None if base_color_texture is None else _pil_image(base_color_texture),
        metallicRoughnessTexture=None if metallic_roughness_texture is None else _pil_image(metallic_roughness_texture),
        occlusionTexture=None if metallic_roughness_texture is None else _pil_image(metallic_roughness_texture),
        normalTexture=None if normal_texture is None else _pil_image(normal_texture),
    )
    textures = {"base_color_texture": base_color_texture, "metallic_roughness_texture": metallic_roughness_texture,
                "normal_texture": normal_texture}
    for name, texture in textures.items():
        if texture is not None and uvs is None:
            raise ValueError(f"a {name} needs uvs")
        if texture is not None and name != "base_color_texture" and (texture.ndim != 3 or texture.shape[2] != 3):
            raise ValueError(f"{name} must be uint8 [H, W, 3], got shape {texture.shape}")
    uv = None if uvs is None else _check_uvs(uvs, len(mesh.vertices))
    visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    if vertex_colors is not None:
        visual.vertex_attributes["color"] = _rgba_u8(vertex_colors, len(mesh.vertices))
    mesh.visual = visual
    if tangents is not None:
        if normals is False:
            raise ValueError("tangents need normals (glTF requires NORMAL with TANGENT)")
        # trimesh writes custom attributes as "_NAME"; _set_buffer_view_targets renames it to TANGENT.
        mesh.vertex_attributes[_TANGENT_KEY] = _file_tangents(tangents, len(mesh.vertices), front_to_plus_z)
    scene = trimesh.Scene()
    scene.add_geometry(mesh, node_name="model", geom_name="model")
    payload = trimesh.exchange.gltf.export_glb(
        scene, include_normals=normals is not False, tree_postprocessor=_set_buffer_view_targets
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, payload)
    log.info("wrote %s (%d vertices, %d faces, %.1f MB)",
             path, len(mesh.vertices), len(mesh.faces), len(payload) / 2**20)
    return path


def write_obj(
    path: Path | str,
    vertices: np.ndarray,
    faces: np.ndarray,
    uvs: np.ndarray | None = None,
    base_color_texture: np.ndarray | None = None,
    vertex_colors: np.ndarray | None = None,
    metallic: float = 0.0,
    roughness: float = 1.0,
    normals: np.ndarray | bool = True,
    front_to_plus_z: bool = False,
    metallic_roughness_texture: np.ndarray | None = None,
    normal_texture: np.ndarray | None = None,
) -> list[Path]:
    """Write ``<stem>.obj`` + ``<stem>.mtl`` (+ ``<stem>.png`` with a texture), each atomically.

    The OBJ names the MTL, and the MTL names the PNG (``map_Kd``), by bare file name, so the
    three files can be moved together. Same arguments and axis convention as :func:`write_glb`;
    ``metallic``/``roughness`` go to the MTL PBR extension lines ``Pm``/``Pr``; vertex colours
    (without a texture) use the common ``v x y z r g b`` extension. A ``metallic_roughness_texture``
    (glTF packing) is split into greyscale ``<stem>_roughness.png`` (``map_Pr``) and
    ``<stem>_metallic.png`` (``map_Pm``), as threestudio writes them; a ``normal_texture`` goes to
    ``<stem>_normal.png`` (``norm``).

    Returns:
        The written files, OBJ first.
    """
    path = Path(path)
    if path.suffix.lower() != ".obj":
        raise ValueError(f"write_obj expects a .obj path, got {path}")
    for name, texture in (("base_color_texture", base_color_texture), ("normal_texture", normal_texture),
                          ("metallic_roughness_texture", metallic_roughness_texture)):
        if texture is not None and uvs is None:
            raise ValueError(f"a {name} needs uvs")
    mesh = _file_mesh(vertices, faces, normals, front_to_plus_z)
    positions = np.asarray(mesh.vertices, dtype=np.float64)
    count = len(positions)
    mtl_path, png_path = path.with_suffix(".mtl"), path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)

    text = io.StringIO()
    text.write(f"# lift3d export: y-up (world z-up rotated), {count} vertices, {len(mesh.faces)} faces\n")
    text.write(f"mtllib {mtl_path.name}\n")
    if vertex_colors is not None and base_color_texture is None:
        rgb = _rgba_u8(vertex_colors, count)[:, :3].astype(np.float64) / 255.0
        np.savetxt(text, np.hstack([positions, rgb]), fmt="v %.7g %.7g %.7g %.4f %.4f %.4f")
    else:
        np.savetxt(text, positions, fmt="v %.7g %.7g %.7g")
    columns = [np.asarray(mesh.faces, dtype=np.int64) + 1]  # OBJ indices are 1-based
    if uvs is not None:
        np.savetxt(text, _check_uvs(uvs, count), fmt="vt %.7g %.7g")
        columns.append(columns[0])
    if normals is not False:
        np.savetxt(text, _unit_normals(mesh), fmt="vn %.6g %.6g %.6g")
        columns.append(columns[0])
    text.write("usemtl material_0\n")
    index = np.stack(columns, axis=-1).reshape(len(mesh.faces), -1)  # [F, 3*k]: v/vt/vn per corner
    if len(columns) == 1:
        face_fmt = "f %d %d %d"
    elif uvs is not None and normals is not False:
        face_fmt = "f %d/%d/%d %d/%d/%d %d/%d/%d"
    elif uvs is not None:
        face_fmt = "f %d/%d %d/%d %d/%d"
    else:
        face_fmt = "f %d//%d %d//%d %d//%d"
    np.savetxt(text, index, fmt=face_fmt)

    mtl = ["# lift3d export", "newmtl material_0", "Ka 0 0 0", "Kd 1 1 1", "Ks 0 0 0", "d 1", "illum 1",
           f"Pm {float(metallic):.6g}", f"Pr {float(roughness):.6g}"]
    written = [path, mtl_path]
    maps = []
    if base_color_texture is not None:
        maps.append(("map_Kd", png_path, _pil_image(base_color_texture)))
    if metallic_roughness_texture is not None:
        packed = _pil_image(metallic_roughness_texture)
        maps.append(("map_Pr", path.with_name(f"{path.stem}_roughness.png"), packed.getchannel("G")))
        maps.append(("map_Pm", path.with_name(f"{path.stem}_metallic.png"), packed.getchannel("B")))
    if normal_texture is not None:
        maps.append(("norm", path.with_name(f"{path.stem}_normal.png"), _pil_image(normal_texture)))
    for keyword, image_path, image in maps:
        mtl.append(f"{keyword} {image_path.name}")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        write_atomic(image_path, buffer.getvalue())
        written.append(image_path)
    write_atomic(mtl_path, ("\n".join(mtl) + "\n").encode("ascii"))
    write_atomic(path, text.getvalue().encode("ascii"))  # OBJ last: it is complete only with its MTL
    log.info("wrote %s", ", ".join(str(p) for p in written))
    return written


def export_textured_mesh(
    directory: Path | str,
    mesh: trimesh.Trimesh,
    color_fn: ColorFn | PBRSurface,
    formats: Sequence[str] = ("glb", "obj"),
    texture_size: int = 1024,
    name: str = "model",
    metallic: float = 0.0,
    roughness: float = 1.0,
    front_to_plus_z: bool = False,
    device: str = "cpu",
    chunk: int = 1 << 18,
) -> list[Path]:
    """Unwrap ``mesh``, bake ``color_fn`` into a texture and write ``<name>.glb`` / ``<name>.obj``.

    A :class:`lift3d.export.texture.PBRSurface` instead of a colour function bakes the PBR
    textures in one pass (module docstring); the written vertex normals are then
    :func:`lift3d.render.pbr.vertex_normals` of ``mesh``, the base its normal map is relative to.

    Args:
        directory: created if missing.
        mesh: world-space (z-up) mesh, e.g. from :func:`lift3d.export.mesh.extract_mesh`
            followed by :func:`lift3d.export.mesh.clean_mesh`.
        color_fn: ``points [N,3] torch -> rgb [N,3]`` in [0,1] (world positions), or a PBR material.
        formats: any of ``"glb"``, ``"obj"``.
        texture_size: width and height of the baked texture.
        name: file stem.
        metallic, roughness, front_to_plus_z: as in :func:`write_glb`.
        device: device of the colour queries.
        chunk: texels per colour query (bounds the bake's memory).

    Returns:
        Every written file (GLB; OBJ, MTL, PNG), in that order.
    """
    unknown = sorted(set(formats) - {"glb", "obj"})
    if unknown:
        raise ValueError(f"unknown mesh formats {unknown}; valid: ['glb', 'obj']")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vertices, faces, uvs, vmapping = unwrap_uv(mesh, texture_size=texture_size)
    if isinstance(color_fn, PBRSurface):
        import torch

        from lift3d.render.pbr import vertex_normals

        welded = vertex_normals(torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float64),
                                torch.as_tensor(np.asarray(mesh.faces), dtype=torch.long)).numpy()
        normals = welded[vmapping]  # seams stay smooth: every copy of a vertex gets its welded normal
        maps = bake_pbr_textures(vertices, faces, uvs, normals, color_fn, size=texture_size, device=device,
                                 chunk=chunk)
        return write_textured_mesh(directory, vertices, faces, uvs, maps.base_color, formats, name=name,
                                   metallic=1.0, roughness=1.0, normals=normals, front_to_plus_z=front_to_plus_z,
                                   metallic_roughness_texture=maps.metallic_roughness,
                                   normal_texture=maps.normal, tangents=maps.tangents)
    texture = bake_texture(vertices, faces, uvs, color_fn, size=texture_size, device=device, chunk=chunk)
    # Normals of the unwrapped copy come from the original (welded) mesh, so seams stay smooth.
    normals = np.asarray(mesh.vertex_normals, dtype=np.float64)[vmapping]
    return write_textured_mesh(directory, vertices, faces, uvs, texture, formats, name=name, metallic=metallic,
                               roughness=roughness, normals=normals, front_to_plus_z=front_to_plus_z)


def write_textured_mesh(
    directory: Path | str,
    vertices: np.ndarray,
    faces: np.ndarray,
    uvs: np.ndarray,
    texture: np.ndarray,
    formats: Sequence[str] = ("glb", "obj"),
    name: str = "model",
    metallic: float = 0.0,
    roughness: float = 1.0,
    normals: np.ndarray | bool = True,
    front_to_plus_z: bool = False,
    metallic_roughness_texture: np.ndarray | None = None,
    normal_texture: np.ndarray | None = None,
    tangents: np.ndarray | None = None,
) -> list[Path]:
    """Write an already UV-mapped mesh with its uint8 sRGB base-colour texture as ``<name>.glb`` / ``.obj``
    (and optional PBR maps, as :func:`write_glb` / :func:`write_obj` take them; OBJ has no tangents)."""
    unknown = sorted(set(formats) - {"glb", "obj"})
    if unknown:
        raise ValueError(f"unknown mesh formats {unknown}; valid: ['glb', 'obj']")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    common = dict(uvs=uvs, base_color_texture=texture, metallic=metallic, roughness=roughness,
                  normals=normals, front_to_plus_z=front_to_plus_z,
                  metallic_roughness_texture=metallic_roughness_texture, normal_texture=normal_texture)
    written: list[Path] = []
    if "glb" in formats:
        written.append(write_glb(directory / f"{name}.glb", vertices, faces, tangents=tangents, **common))
    if "obj" in formats:
        written.extend(write_obj(directory / f"{name}.obj", vertices, faces, **common))
    return written


# --------------------------------------------------------------------------- helpers


def _file_mesh(
    vertices: np.ndarray, faces: np.ndarray, normals: np.ndarray | bool, front_to_plus_z: bool
) -> trimesh.Trimesh:
    """A trimesh in the file frame, with unit vertex normals cached when they are wanted."""
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"vertices must be [V,3] and faces [F,3], got {vertices.shape} and {faces.shape}")
    if len(faces) and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise ValueError("faces index outside the vertex array")
    rotation = world_to_file_rotation(front_to_plus_z)
    # process=False keeps vertex order and the duplicated seam vertices the UVs rely on.
    mesh = trimesh.Trimesh(vertices=vertices @ rotation.T, faces=faces, process=False)
    if isinstance(normals, np.ndarray):
        if normals.shape != vertices.shape:
            raise ValueError(f"normals must be [V,3] like vertices, got {normals.shape}")
        mesh.vertex_normals = _safe_unit(np.asarray(normals, dtype=np.float64) @ rotation.T)
    elif normals:
        mesh.vertex_normals = _safe_unit(np.asarray(mesh.vertex_normals, dtype=np.float64))
    return mesh


_TANGENT_KEY = "_TANGENT"
"""The custom attribute trimesh writes; renamed to the standard TANGENT in the JSON tree."""


def _file_tangents(tangents: np.ndarray, count: int, front_to_plus_z: bool) -> np.ndarray:
    """World tangents [V,4] in the file frame, float32 (a proper rotation keeps the handedness w)."""
    tangents = np.asarray(tangents, dtype=np.float64)
    if tangents.shape != (count, 4):
        raise ValueError(f"tangents must be [V,4] with V={count}, got {tangents.shape}")
    if not np.all(np.abs(np.abs(tangents[:, 3]) - 1.0) < 1e-6):
        raise ValueError("tangents[:, 3] (handedness) must be +1 or -1")
    xyz = _safe_unit(tangents[:, :3] @ world_to_file_rotation(front_to_plus_z).T)
    return np.concatenate([xyz, tangents[:, 3:]], axis=-1).astype(np.float32)


def _set_buffer_view_targets(tree: dict) -> None:
    """Mark vertex and index buffer views (the glTF validator hints when ``target`` is missing),
    and give our tangents their standard attribute name."""
    accessors, views = tree.get("accessors", []), tree.get("bufferViews", [])
    targets: dict[int, int] = {}
    for gltf_mesh in tree.get("meshes", []):
        for primitive in gltf_mesh.get("primitives", []):
            attributes = primitive.get("attributes", {})
            if _TANGENT_KEY in attributes:
                attributes["TANGENT"] = attributes.pop(_TANGENT_KEY)
            for accessor in primitive.get("attributes", {}).values():
                targets[accessors[accessor]["bufferView"]] = 34962  # ARRAY_BUFFER
            if "indices" in primitive:
                targets[accessors[primitive["indices"]]["bufferView"]] = 34963  # ELEMENT_ARRAY_BUFFER
    used: dict[int, int] = {}
    for accessor in accessors:  # only views that back a single accessor, to stay on the safe side
        used[accessor.get("bufferView", -1)] = used.get(accessor.get("bufferView", -1), 0) + 1
    for view, target in targets.items():
        if used.get(view) == 1 and 0 <= view < len(views):
            views[view]["target"] = target


def _unit_normals(mesh: trimesh.Trimesh) -> np.ndarray:
    return _safe_unit(np.asarray(mesh.vertex_normals, dtype=np.float64))


def _safe_unit(normals: np.ndarray) -> np.ndarray:
    """Unit-length normals; zero or non-finite ones (isolated/degenerate vertices) become +Y."""
    length = np.linalg.norm(normals, axis=-1, keepdims=True)
    bad = ~np.isfinite(length[:, 0]) | (length[:, 0] < 1e-12)
    out = np.where(bad[:, None], 0.0, normals / np.where(length > 0, length, 1.0))
    out[bad] = (0.0, 1.0, 0.0)  # the glTF validator rejects non-unit normals
    return out


def _check_uvs(uvs: np.ndarray, count: int) -> np.ndarray:
    uvs = np.asarray(uvs, dtype=np.float64)
    if uvs.shape != (count, 2):
        raise ValueError(f"uvs must be [V,2] with V={count}, got {uvs.shape}")
    return uvs


def _pil_image(image: np.ndarray) -> Image.Image:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"textures must be uint8 [H,W,3|4], got {array.dtype} {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array))


def _rgba_u8(colors: np.ndarray, count: int) -> np.ndarray:
    """[V,3|4] colours (float in [0,1] or uint8) as uint8 RGBA."""
    colors = np.asarray(colors)
    if colors.ndim != 2 or colors.shape[0] != count or colors.shape[1] not in (3, 4):
        raise ValueError(f"vertex_colors must be [V,3|4] with V={count}, got {colors.shape}")
    if colors.dtype != np.uint8:
        colors = np.clip(np.round(np.asarray(colors, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
    if colors.shape[1] == 3:
        colors = np.concatenate([colors, np.full((count, 1), 255, dtype=np.uint8)], axis=1)
    return colors
