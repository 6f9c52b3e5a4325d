"""File input/output for nbtorch (each submodule imported when one of its names is first used; gemmi and h5py when
first needed).

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

import importlib

#: The package's public names, by the submodule that defines them (imported on first use: a command line that reads
#: no DIALS, CrystFEL or NeXus file does not pay for those readers at start-up).
_EXPORTS = {
    "_atomic": ("atomic_write", "atomic_write_from"),
    "safe_output": ("check_output_paths", "check_output_folder", "output_target", "same_file", "OutputRefused"),
    "hkl": ("HKLData", "read_hkl", "write_hkl", "hkl_to_grid"),
    "matrix": ("read_mosflm_matrix", "write_mosflm_matrix", "mosflm_matrix_cell"),
    "sources": ("read_sources", "write_sources", "SOURCE_COLUMNS"),
    "smv": ("read_smv", "write_smv", "read_smv_mask", "nanobragg_header_items", "SMV_TYPES"),
    "images": ("read_raw_float", "write_raw_float", "write_pgm", "read_pgm", "pgm_pixels", "read_image",
               "ObservedImage"),
    "structure_files": ("is_mtz", "read_mtz", "model_cell", "structure_factors_from_model", "expand_to_p1",
                        "detector_corner_resolution", "StructureFactorInfo", "StructureFileError"),
    "nexus": ("write_nxmx", "read_nxmx", "nxmx_geometry", "lab_to_nexus", "NexusGeometry", "nxmx_layout"),
    "crystfel": ("Geometry", "GeometryFileError", "read_geom", "write_geom", "geometry_mask"),
    "refl": ("ReflectionTable", "ReflectionFileError", "read_reflections", "write_reflections", "table_from_columns"),
    "dials": ("read_expt", "read_experiments", "write_experiments"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name: str):
    """A public name, from its submodule (imported now if it was not)."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
