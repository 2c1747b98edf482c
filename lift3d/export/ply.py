"""Binary little-endian PLY: Gaussians in the standard 3DGS layout, and a small vertex reader.

The 3DGS layout (read by the common splat viewers): x y z nx ny nz f_dc_0..2 f_rest_0..(3K-1)
opacity scale_0..2 rot_0..3, all float32; opacity is a logit, scales are logs, rot is wxyz,
and f_rest is stored channel-major (all R coefficients, then G, then B) as the 3DGS code does.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from torch import Tensor

_PLY_TYPES = {
    "char": "i1", "uchar": "u1", "short": "i2", "ushort": "u2", "int": "i4", "uint": "u4",
    "float": "f4", "double": "f8", "int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2",
    "int32": "i4", "uint32": "u4", "float32": "f4", "float64": "f8",
}


def gaussian_ply_attributes(num_rest_coefficients: int) -> list[str]:
    """Property names of the 3DGS layout for ``num_rest_coefficients`` SH coefficients per channel."""
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    names += [f"f_rest_{i}" for i in range(3 * num_rest_coefficients)]
    names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    return names


def write_gaussians_ply(
    path: Path,
    means: Tensor,
    sh_dc: Tensor,
    sh_rest: Tensor,
    opacity_logits: Tensor,
    log_scales: Tensor,
    quats: Tensor,
) -> None:
    """Write N Gaussians: means [N,3], sh_dc [N,3], sh_rest [N,K,3], opacity logits [N], log scales [N,3], quats [N,4]."""
    n = means.shape[0]
    rest = sh_rest.reshape(n, -1, 3).transpose(1, 2).reshape(n, -1)  # channel-major, as 3DGS
    columns = [
        means.cpu().float(), means.new_zeros(n, 3).cpu().float(), sh_dc.cpu().float(), rest.cpu().float(),
        opacity_logits.reshape(n, 1).cpu().float(), log_scales.cpu().float(), quats.cpu().float(),
    ]
    data = np.concatenate([c.numpy().reshape(n, -1) for c in columns], axis=1).astype("<f4")
    names = gaussian_ply_attributes(sh_rest.reshape(n, -1, 3).shape[1])
    assert data.shape[1] == len(names), (data.shape, len(names))
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    header += [f"property float {name}" for name in names]
    header += ["end_header"]
    write_atomic(path, ("\n".join(header) + "\n").encode("ascii") + data.tobytes())


def write_atomic(path: Path, payload: bytes) -> None:
    """Write bytes to ``path`` through a temporary file and a rename (no half-written files)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def read_ply(path: Path) -> dict[str, np.ndarray]:
    """The vertex element of a PLY file (ascii or binary little-endian) as name -> column."""
    raw = Path(path).read_bytes()
    end = raw.find(b"end_header")
    if not raw.startswith(b"ply") or end < 0:
        raise ValueError(f"{path} is not a PLY file")
    header_end = raw.index(b"\n", end) + 1
    lines = raw[:header_end].decode("ascii", errors="replace").splitlines()
    fmt = None
    elements: list[tuple[str, int, list[tuple[str, str]]]] = []
    for line in lines:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "format":
            fmt = parts[1]
        elif parts[0] == "element":
            elements.append((parts[1], int(parts[2]), []))
        elif parts[0] == "property":
            if parts[1] == "list":
                if elements and elements[-1][0] == "vertex":
                    raise ValueError(f"{path}: list properties on vertices are not supported")
                elements[-1][2].append((parts[-1], "list"))
            else:
                elements[-1][2].append((parts[2], _PLY_TYPES[parts[1]]))
    if not elements or elements[0][0] != "vertex":
        raise ValueError(f"{path}: the first PLY element must be 'vertex'")
    _, count, properties = elements[0]
    dtype = np.dtype([(name, "<" + code) for name, code in properties])
    if fmt == "binary_little_endian":
        table = np.frombuffer(raw, dtype=dtype, count=count, offset=header_end)
    elif fmt == "ascii":
        body = raw[header_end:].decode("ascii").split("\n")[:count]
        table = np.array([tuple(float(v) for v in row.split()[: len(properties)]) for row in body], dtype=dtype)
    else:
        raise ValueError(f"{path}: PLY format {fmt!r} is not supported (binary_little_endian or ascii)")
    return {name: np.asarray(table[name]) for name, _ in properties}


def read_ply_vertices(path: Path) -> dict[str, np.ndarray]:
    """Positions ``xyz`` [N,3] and, when present, colours ``rgb`` [N,3] in [0,1]."""
    columns = read_ply(path)
    out = {"xyz": np.stack([columns["x"], columns["y"], columns["z"]], axis=-1).astype(np.float32)}
    if all(c in columns for c in ("red", "green", "blue")):
        rgb = np.stack([columns["red"], columns["green"], columns["blue"]], axis=-1).astype(np.float32)
        out["rgb"] = rgb / 255.0 if rgb.max() > 1.0 else rgb
    return out
