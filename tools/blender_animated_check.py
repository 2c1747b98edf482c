"""Open an animated GLB in Blender and report what Blender plays at each keyframe.

Runs inside Blender (its bundled Python has ``bpy``), headless::

    blender -b --factory-startup --python tools/blender_animated_check.py -- MODEL.glb OUT.json [--render PNG --frames K,..]

Blender's glTF importer turns the morph targets into shape keys and the weights animation into
an action on them. For every keyframe time stored in the file (the animation's input accessor),
the scene is set to that time, the depsgraph evaluated, and the evaluated mesh's vertices
(Blender world coordinates: z up, which are lift3d's world coordinates) are written to OUT.json
with the shape-key names, the action's f-curve count and the frame rate, and so are the vertices
halfway between consecutive keyframes. ``--render`` also
renders the listed keyframe indices side by side with Cycles on the CPU (no GPU or display needed).
"""

from __future__ import annotations

import json
import sys

import bpy  # noqa: F401  (only inside Blender)


def _arguments() -> tuple[str, str, str, list[int]]:
    argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    if len(argv) < 2:
        raise SystemExit("usage: blender -b --python blender_animated_check.py -- MODEL.glb OUT.json [--render PNG --frames 0,2]")
    render, frames = "", [0]
    if "--render" in argv:
        render = argv[argv.index("--render") + 1]
    if "--frames" in argv:
        frames = [int(v) for v in argv[argv.index("--frames") + 1].split(",")]
    return argv[0], argv[1], render, frames


def _keyframe_seconds(action) -> list[float]:
    """The keyframe times of the imported action, in seconds (Blender stores frames)."""
    fps = bpy.context.scene.render.fps / bpy.context.scene.render.fps_base
    frames = sorted({round(point.co[0], 4) for curve in action.fcurves for point in curve.keyframe_points})
    return [frame / fps for frame in frames]


def _set_time(seconds: float) -> None:
    scene = bpy.context.scene
    fps = scene.render.fps / scene.render.fps_base
    frame = seconds * fps
    scene.frame_set(int(frame), subframe=frame - int(frame))


def _evaluated_vertices(obj) -> list[list[float]]:
    depsgraph = bpy.context.evaluated_depsgraph_get()
    evaluated = obj.evaluated_get(depsgraph)
    mesh = evaluated.to_mesh()
    matrix = obj.matrix_world
    points = [list(matrix @ vertex.co) for vertex in mesh.vertices]
    evaluated.to_mesh_clear()
    return points


def _render_side_by_side(obj, seconds: list[float], path: str) -> None:
    """Cycles (CPU) renders of ``obj`` at each time, from the front (+x), joined left to right."""
    import mathutils

    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = 16
    scene.cycles.use_denoising = False  # Debian's build has no OpenImageDenoise
    scene.render.resolution_x = scene.render.resolution_y = 256
    scene.render.film_transparent = False
    world = bpy.data.worlds.new("lift3d") if scene.world is None else scene.world
    scene.world = world
    world.use_nodes = True
    world.node_tree.nodes["Background"].inputs[0].default_value = (0.75, 0.8, 0.9, 1.0)
    world.node_tree.nodes["Background"].inputs[1].default_value = 1.0
    camera_data = bpy.data.cameras.new("camera")
    camera_data.angle_y = 0.7
    camera = bpy.data.objects.new("camera", camera_data)
    scene.collection.objects.link(camera)
    camera.location = (3.2, 0.0, 0.8)
    direction = mathutils.Vector((0.0, 0.0, 0.0)) - camera.location
    camera.rotation_euler = direction.to_track_quat("-Z", "Y").to_euler()
    scene.camera = camera
    sun_data = bpy.data.lights.new("sun", type="SUN")
    sun_data.energy = 3.0
    sun = bpy.data.objects.new("sun", sun_data)
    sun.rotation_euler = (0.6, 0.2, 0.8)
    scene.collection.objects.link(sun)
    images = []
    for index, time in enumerate(seconds):
        _set_time(time)
        scene.render.filepath = f"{path}.{index}.png"
        bpy.ops.render.render(write_still=True)
        images.append(bpy.data.images.load(scene.render.filepath))
    width, height = images[0].size
    joined = bpy.data.images.new("joined", width * len(images), height)
    pixels = [0.0] * (width * len(images) * height * 4)
    for column, image in enumerate(images):
        source = list(image.pixels)
        for row in range(height):
            start = (row * width * len(images) + column * width) * 4
            pixels[start:start + width * 4] = source[row * width * 4:(row + 1) * width * 4]
    joined.pixels = pixels
    joined.filepath_raw = path
    joined.file_format = "PNG"
    joined.save()


def main() -> None:
    model, out, render, render_frames = _arguments()
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.import_scene.gltf(filepath=model)
    meshes = [obj for obj in bpy.context.scene.objects if obj.type == "MESH"]
    if len(meshes) != 1:
        raise SystemExit(f"expected one mesh object in {model}, found {len(meshes)}")
    obj = meshes[0]
    keys = obj.data.shape_keys
    if keys is None or keys.animation_data is None or keys.animation_data.action is None:
        raise SystemExit(f"{model}: Blender imported no shape-key animation")
    action = keys.animation_data.action
    seconds = _keyframe_seconds(action)
    report = {
        "shape_keys": [block.name for block in keys.key_blocks],
        "fcurves": len(action.fcurves),
        "fps": bpy.context.scene.render.fps / bpy.context.scene.render.fps_base,
        "keyframe_seconds": seconds,
        "vertices": [],
    }
    for time in seconds:
        _set_time(time)
        report["vertices"].append(_evaluated_vertices(obj))
    # Halfway between keyframes a LINEAR animation blends the two neighbouring shapes equally.
    report["midpoint_vertices"] = []
    for before, after in zip(seconds, seconds[1:]):
        _set_time(0.5 * (before + after))
        report["midpoint_vertices"].append(_evaluated_vertices(obj))
    with open(out, "w") as handle:
        json.dump(report, handle)
    if render:
        _render_side_by_side(obj, [seconds[k] for k in render_frames], render)


main()
