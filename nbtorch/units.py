"""Physical constants and unit conversions.

This is the only module where unit conversions live.  API units are Å (cell, wavelength), mm (detector lengths),
degrees (angles), mrad (divergence), µm (sensor thickness, water), photons/m² (fluence).
"""
from __future__ import annotations

import math

import torch

#: Thomson cross section r_e² in m² (the value nanoBragg uses).
R_E_SQUARED_M2 = 7.94079248018965e-30
#: Default fluence (photons/m²): chosen by nanoBragg so that r_e²·fluence = 1.
DEFAULT_FLUENCE = 1.25932015286227e29
#: hc in eV·Å, used for -energy.
HC_EV_ANGSTROM = 12398.42
#: Avogadro's number.
AVOGADRO = 6.02214179e23
#: Scattering amplitude of one water molecule, as nanoBragg uses it (electrons).
WATER_F = 2.57
#: Degrees per milliradian (refinement increments are in mrad, angles in the API in degrees).
DEG_PER_MRAD = 180.0 / math.pi / 1000.0
#: Degrees per radian.
DEG_PER_RAD = 180.0 / math.pi
#: Constant of the round-crystal lattice factor normalisation.
ROUND_XTAL_NORM = 0.723601254558268
#: Gaussian spots (``-gauss_xtal``): F_latt = N³·exp(−ρ²·fudge/GAUSS_RHO2_SCALE), ρ² nanoBragg's reciprocal radius².
GAUSS_RHO2_SCALE = 0.63
#: Top-hat spots (``-tophat_spots``): F_latt = N³ where ρ²·fudge < TOPHAT_RHO2_LIMIT (= 0.63², nanoBragg's value).
TOPHAT_RHO2_LIMIT = 0.3969


def _scaled(x, k: float):
    """x·k; a tensor x is multiplied by k as a tensor of its own dtype (the same number: torch rounds a Python
    scalar to the tensor's dtype), because under ``jacfwd`` a 0-dim float32 tensor times a Python float gets a
    float64 tangent in torch 2.13."""
    if isinstance(x, torch.Tensor):
        return x * torch.as_tensor(k, dtype=x.dtype, device=x.device)
    return x * k


def deg2rad(x):
    """Degrees → radians; works on floats and tensors of any shape."""
    return _scaled(x, math.pi / 180.0)


def rad2deg(x):
    """Radians → degrees; works on floats and tensors of any shape."""
    return _scaled(x, 180.0 / math.pi)


def mrad2rad(x):
    """Milliradians → radians."""
    return x * 1e-3


def rad2mrad(x):
    """Radians → milliradians."""
    return x * 1e3


def as_tensor(x, dtype=None, device=None) -> torch.Tensor:
    """Convert ``x`` to a tensor of ``dtype``/``device`` (a tensor stays differentiable)."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype=dtype or x.dtype, device=device or x.device)
    return torch.as_tensor(x, dtype=dtype or torch.get_default_dtype(), device=device)


# ---------------------------------------------------------------------------------------------------------------
# length and fraction conversions used at the flag boundary (nanoBragg's command-line units → nbtorch's API units)

#: Ångström per millimetre (crystal sizes are given in mm, cell lengths are in Å).
ANGSTROM_PER_MM = 1e7
#: Ångström per metre (``-sourcefile`` wavelengths are in metres).
ANGSTROM_PER_M = 1e10
#: Metres per millimetre (``-beamsize`` for the fluence; nanoBragg prints positions in metres).
M_PER_MM = 1e-3
#: Millimetres per metre (file headers in SI: miniCBF, NeXus).
MM_PER_M = 1e3
#: Millimetres per centimetre.
MM_PER_CM = 10.0
#: Millimetres per micrometre (sensor thickness is in µm in the Setup, mm in NeXus).
MM_PER_UM = 1e-3
#: Millimetres per nanometre.
MM_PER_NM = 1e-6
#: Metres per micrometre (the water thickness is in µm; nanoBragg's water term works in SI).
M_PER_UM = 1e-6
#: Cubic centimetres per cubic metre.
CM3_PER_M3 = 1e6
#: Density of water (g/cm³) and its molar mass (g/mol), as nanoBragg's water term takes them.
WATER_G_PER_CM3 = 1.0
WATER_G_PER_MOL = 18.0
#: Percent per unit fraction (``-dispersion`` is a percentage).
PERCENT = 100.0


def mm_to_angstrom(x):
    """Millimetres → Ångström (floats or tensors)."""
    return x * ANGSTROM_PER_MM


def m_to_angstrom(x):
    """Metres → Ångström (floats or tensors)."""
    return x * ANGSTROM_PER_M


def mm_to_m(x):
    """Millimetres → metres (floats or tensors)."""
    return x * M_PER_MM


def um_to_m(x):
    """Micrometres → metres (floats or tensors)."""
    return x * M_PER_UM


def um_to_mm(x):
    """Micrometres → millimetres (floats or tensors)."""
    return x * MM_PER_UM


def percent_to_fraction(x):
    """Percent → fraction (``-dispersion 0.5`` → 0.005)."""
    return x / PERCENT


def wavelength_from_energy(energy_ev):
    """Photon energy (eV) → wavelength (Å): λ = hc/E with nanoBragg's hc = :data:`HC_EV_ANGSTROM`."""
    return HC_EV_ANGSTROM / energy_ev
