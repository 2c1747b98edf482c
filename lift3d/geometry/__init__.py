"""Geometry utilities shared by representations (tetrahedral grids, marching tetrahedra)."""
