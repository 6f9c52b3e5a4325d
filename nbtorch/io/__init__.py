"""File input/output for nbtorch (numpy only at import time; gemmi and h5py are imported when first needed).

* :mod:`.smv` — SMV/ADSC images (``-intfile``, ``-noisefile``, ``-mask``, ``-img``) in nanoBragg's exact layout.
* :mod:`.hkl` — ``h k l F`` structure-factor text files (``-hkl``); never an ``Fdump.bin`` cache.
* :mod:`.matrix` — MOSFLM λ-scaled orientation matrices (``-mat``).
* :mod:`.sources` — explicit source lists (``-sourcefile``).
* :mod:`.images` — raw float images (``-floatfile``), PGM previews, and observed images with masks.
* :mod:`.structure_files` — structure factors from MTZ files and PDB/mmCIF models (``-hkl FILE.mtz``, ``-pdb``;
  optional gemmi).
* :mod:`.nexus` — NXmx NeXus/HDF5 images with their geometry (``-nexusfile``; optional h5py; one module per panel
  for panel detectors), read back by :func:`read_image`; :func:`nxmx_layout` the panels of a multi-module file.
* :mod:`.crystfel` — CrystFEL geometry files (``-geom``): panels, hierarchy, masks, data-array layout.
* :mod:`.dials` — DIALS experiment lists (``-expt``); :mod:`.refl` — DIALS reflection tables (optional msgpack).

Every writer follows one safe-output rule (:mod:`.safe_output`, docs/io.md "Output files"): command lines refuse,
before any work, an output that is an input or another output, a directory, or in a missing or unwritable folder
(:func:`check_output_paths`); files are written atomically (temporary file + :func:`os.replace`), through symlinks,
and devices/FIFOs in place (:func:`atomic_write`).
"""
from __future__ import annotations

from ._atomic import atomic_write, atomic_write_from
from .hkl import HKLData, hkl_to_grid, read_hkl, write_hkl
from .images import (
    ObservedImage,
    pgm_pixels,
    read_image,
    read_pgm,
    read_raw_float,
    write_pgm,
    write_raw_float,
)
from .crystfel import Geometry, GeometryFileError, geometry_mask, read_geom, write_geom
from .dials import read_experiments, read_expt, write_experiments
from .matrix import mosflm_matrix_cell, read_mosflm_matrix, write_mosflm_matrix
from .nexus import NexusGeometry, lab_to_nexus, nxmx_geometry, nxmx_layout, read_nxmx, write_nxmx
from .refl import ReflectionFileError, ReflectionTable, read_reflections, table_from_columns, write_reflections
from .safe_output import OutputRefused, check_output_folder, check_output_paths, output_target, same_file
from .smv import SMV_TYPES, nanobragg_header_items, read_smv, read_smv_mask, write_smv
from .sources import SOURCE_COLUMNS, read_sources, write_sources
from .structure_files import (
    StructureFactorInfo,
    StructureFileError,
    detector_corner_resolution,
    expand_to_p1,
    is_mtz,
    model_cell,
    read_mtz,
    structure_factors_from_model,
)

__all__ = [
    "atomic_write",
    "atomic_write_from",
    "check_output_paths",
    "check_output_folder",
    "output_target",
    "same_file",
    "OutputRefused",
    "HKLData",
    "read_hkl",
    "write_hkl",
    "hkl_to_grid",
    "read_mosflm_matrix",
    "write_mosflm_matrix",
    "mosflm_matrix_cell",
    "read_sources",
    "write_sources",
    "SOURCE_COLUMNS",
    "read_smv",
    "write_smv",
    "read_smv_mask",
    "nanobragg_header_items",
    "SMV_TYPES",
    "read_raw_float",
    "write_raw_float",
    "write_pgm",
    "read_pgm",
    "pgm_pixels",
    "read_image",
    "ObservedImage",
    "is_mtz",
    "read_mtz",
    "model_cell",
    "structure_factors_from_model",
    "expand_to_p1",
    "detector_corner_resolution",
    "StructureFactorInfo",
    "StructureFileError",
    "write_nxmx",
    "read_nxmx",
    "nxmx_geometry",
    "lab_to_nexus",
    "NexusGeometry",
    "nxmx_layout",
    "Geometry",
    "GeometryFileError",
    "read_geom",
    "write_geom",
    "geometry_mask",
    "ReflectionTable",
    "ReflectionFileError",
    "read_reflections",
    "write_reflections",
    "table_from_columns",
    "read_expt",
    "read_experiments",
    "write_experiments",
]
