"""The flag table and what is derived from it: validation of every value (kind, finiteness, range) with messages that
name the flag or the header field, the "last flag wins" rule, the generated docs table and the CLI's promise that a
bad command line writes nothing."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import nbtorch
from nbtorch import cli
from nbtorch.args import ALIASES, FLAGS, SECTIONS, SWITCH_DEFAULTS, last_flag, parse_args, switch_states
from nbtorch.args.export import _RULES
from nbtorch.cli.docs import DOCS_BEGIN, DOCS_END, generated_section
from nbtorch.cli.help import flag_table_markdown
from nbtorch.io import write_smv
from tests.golden import GOLDEN

BASE = "-default_F 100 -cell 50 50 50 90 90 90 -N 3 -detpixels 12 -pixel 0.5 -distance 80 -oversample 1"
SMALL = BASE.split() + ["-nopgm", "-noprogress"]
DOCS = GOLDEN.parent.parent.parent / "docs" / "cli.md"


def _error(args: str) -> str:
    with pytest.raises(ValueError) as info:
        nbtorch.from_nanobragg_args(args)
    return str(info.value)


def _plain(msg: str) -> None:
    """Messages show plain numbers, never a numpy/torch repr."""
    for bad in ("np.", "numpy", "array(", "tensor(", "float64", "Traceback"):
        assert bad not in msg, msg


# ----------------------------------------------------------------------------------------------------------------
# the table itself


def test_table_is_consistent():
    assert set(f.section for f in FLAGS.values()) == set(SECTIONS)
    for flag in FLAGS.values():
        assert flag.write in ("", "no", "carry") or flag.write in _RULES, flag.name
        if flag.switch is not None:
            assert flag.switch[0] in SWITCH_DEFAULTS
        for alias in flag.aliases:
            assert ALIASES[alias] == flag.name
    # every rule of the inverse is used by some flag
    assert set(_RULES) == {f.write for f in FLAGS.values()} - {"", "no", "carry"}


def test_every_field_path_names_a_real_field():
    """``field`` paths of the table resolve on a built model (so the docs and the inverse name real leaves)."""
    from nbtorch.args.export import _Context

    params, setup = nbtorch.from_nanobragg_args(BASE)
    ctx = _Context(params, setup, parse_args([]), None, False, ".")
    for flag in FLAGS.values():
        if flag.field and not flag.field.startswith("cli."):
            ctx.field(flag.field)  # raises AttributeError/IndexError for a wrong path
    outputs = nbtorch.args.build(parse_args(BASE), base_dir=".")[2].outputs
    for flag in FLAGS.values():
        if flag.field.startswith("cli."):
            assert hasattr(outputs, flag.field[4:]), flag.name


def test_docs_table_is_generated_from_the_table():
    text = DOCS.read_text(encoding="utf-8")
    assert text.count(DOCS_BEGIN) == 1 and text.count(DOCS_END) == 1
    assert generated_section(text) == "\n\n" + flag_table_markdown() + "\n", \
        "docs/cli.md is out of date: run python -m nbtorch.cli.docs --update docs/cli.md"
    for name in FLAGS:
        assert f"`{name}" in text, name


def test_help_shows_ranges_defaults_and_table_facts(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"-oversample N\s+sub-pixels per pixel edge \(default\s+ceil", text)
    assert "allowed [1, 64]" in text and "allowed (0, 1e7]" in text
    flat = " ".join(text.split())
    assert "switches to the CUSTOM convention" in flat and "selects the sample pivot in CUSTOM" in flat
    assert "-img/-mask header PIXEL_SIZE" in flat
    assert "no effect; accepted for compatibility" in text


# ----------------------------------------------------------------------------------------------------------------
# values


@pytest.mark.parametrize("extra,flag", [
    ("-oversample 2.7", "-oversample"), ("-detpixels 63.7", "-detpixels"), ("-mosaic 1 -mosaic_domains 2.5",
     "-mosaic_domains"), ("-seed 1.5", "-seed"), ("-phisteps 2.5", "-phisteps"), ("-roi 0 3.5 0 3", "-roi"),
    ("-detpixels_f 1e-3", "-detpixels_f"), ("-misset_seed 0.5", "-misset_seed"),
])
def test_counts_must_be_integers(extra, flag):
    msg = _error(f"{BASE} {extra}")
    assert msg.startswith(f"{flag} must be an integer") and "got " in msg, msg
    _plain(msg)


def test_integral_counts_are_accepted_as_integers():
    _, s = nbtorch.from_nanobragg_args(f"{BASE} -oversample 2.0 -detpixels_f 1e1")
    assert s.oversample == 2 and s.fpixels == 10 and isinstance(s.oversample, int)


@pytest.mark.parametrize("extra,words", [
    ("-fluence 1e300", ["-fluence", "<= 1e40 photons/m²", "got 1e300"]),
    ("-cell 1e300 1e300 1e300 90 90 90", ["-cell", "<= 1e6 Å"]),
    ("-seed 1e12", ["-seed", "between -2147483648 and 2147483647"]),
    ("-polar 1.5", ["-polar", ">= -1 and <= 1", "params.beam.polarization"]),
    ("-mosaic -1", ["-mosaic", ">= 0 and <= 90 deg"]),
    ("-dispersion 250", ["-dispersion", "< 200 %"]),
    ("-detector_abs -3", ["-detector_abs", "(or inf)"]),
    ("-pivot middle", ["-pivot must be 'beam' or 'sample'"]),
    ("-energy 1", ["-energy 1 eV gives lambda", "(0, 1e4]"]),
    ("-flux 1e30 -exposure 1e9 -beamsize 0.001", ["-flux", "-exposure", "-beamsize", "fluence"]),
    ("-xtalsize 5000", ["-xtalsize", "<= 1e3 mm"]),
    ("-lambda nan", ["-lambda expects a finite number"]),
    ("-roi 0 12 0 3", ["-roi 0 12 0 3", "xmax <= 11"]),
    ("-printout_pixel 3 12", ["-printout_pixel 3 12", "slow in 0..11"]),
    ("-fdet_vector 0 0 0", ["-fdet_vector 0 0 0", "non-zero"]),
])
def test_out_of_range_values_name_the_flag_and_range(extra, words):
    msg = _error(f"{BASE} {extra}")
    for w in words:
        assert w in msg, (w, msg)
    _plain(msg)


def test_detector_abs_accepts_inf():
    _, s = nbtorch.from_nanobragg_args(f"{BASE} -detector_thick 100 -detector_abs inf")
    assert s.thickness_um == 0 and s.mu_per_um == 0  # spec Q22


def test_header_values_are_checked_and_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_smv("bad.img", np.ones((12, 12), np.uint16), {"PIXEL_SIZE": "0", "DISTANCE": "abc", "WAVELENGTH": 1.2})
    args = "-default_F 100 -cell 50 50 50 90 90 90 -N 3 -oversample 1 -img bad.img"
    msg = _error(args)
    assert "-img bad.img: header PIXEL_SIZE (for -pixel) must be > 0" in msg and "got 0" in msg, msg
    msg = _error(args + " -pixel 0.5")
    assert "-img bad.img: header DISTANCE (for -distance) expects a number, got 'abc'" in msg, msg
    # values the command line overrides are never used, so never an error
    p, s = nbtorch.from_nanobragg_args(args + " -pixel 0.5 -distance 90")
    assert s.pixel_size == 0.5 and p.detector.distance.item() == 90 and p.beam.wavelength.item() == 1.2


def test_mask_header_values_are_named_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_smv("m.img", np.ones((12, 12), np.uint16), {"PIXEL_SIZE": 0.5, "WAVELENGTH": -1})
    msg = _error("-default_F 100 -cell 50 50 50 90 90 90 -N 3 -oversample 1 -mask m.img")
    assert "-mask m.img: header WAVELENGTH (for -lambda) must be > 0" in msg, msg


# ----------------------------------------------------------------------------------------------------------------
# last flag wins


def test_last_flag_wins_helper():
    o = parse_args("-round_xtal -xds -gauss_xtal -mosflm -pivot sample -distance 50")
    assert last_flag(o, switch_states("shape"), "square") == "gauss"
    assert last_flag(o, switch_states("convention"), "MOSFLM") == "MOSFLM"
    assert last_flag(o, switch_states("interpolate"), None) is None
    assert last_flag(parse_args("-nonoise -noisefile n.img"), switch_states("noise"), True) is True
    assert last_flag(parse_args("-noisefile n.img -nonoise"), switch_states("noise"), True) is False


@pytest.mark.parametrize("flags,pivot", [
    ("-pivot sample -distance 50", "beam"), ("-distance 50 -pivot sample", "sample"),
    ("-close_distance 50", "sample"), ("-twotheta 5 -Xbeam 3", "beam"), ("-Xbeam 3 -twotheta 5", "sample"),
    ("-ORGX 5", "sample"), ("", "beam"),
])
def test_custom_pivot_follows_the_last_pivot_flag(flags, pivot):
    _, s = nbtorch.from_nanobragg_args(f"{BASE} -fdet_vector 0 0 1 {flags}".replace("-distance 80", ""))
    assert s.convention == "CUSTOM" and s.pivot == pivot


def test_mosaic_auto_rule():
    for extra, n in (("-mosaic 0.5", 10), ("-mosaic 0.5 -mosaic_domains 3", 3), ("-mosaic_domains 4", 1),
                     ("-mosaic 0 -mosaic_domains 4", 1)):
        p, s = nbtorch.from_nanobragg_args(f"{BASE} {extra}")
        assert s.n_domains == n, extra
        assert p.crystal.mosaic_spread.item() == (0.5 if n > 1 else 0.0)


# ----------------------------------------------------------------------------------------------------------------
# the command line: one line on stderr, exit 2, nothing written


@pytest.mark.parametrize("extra", [
    ["-oversample", "2.7"], ["-detpixels", "63.7"], ["-mosaic", "1", "-mosaic_domains", "2.5"], ["-seed", "1.5"],
    ["-seed", "1e12"], ["-fluence", "1e300"], ["-cell", "1e300", "1e300", "1e300", "90", "90", "90"],
    ["-printout_pixel", "0", "99"], ["-adc", "-3"],
])
def test_cli_rejects_bad_values_before_writing_anything(extra, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(SMALL + extra) == 2
    out, err = capsys.readouterr()
    assert err.startswith("nbtorch: error: ") and err.count("\n") == 1, err
    assert extra[0] in err
    _plain(err)
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_an_image_that_overflows(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(SMALL + ["-water", "1e6", "-fluence", "1e40", "-seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "not finite" in err and "-fluence" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_header_errors_name_the_field(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_smv("in.img", np.ones((12, 12), np.uint16), {"PIXEL_SIZE": "-0.1"})
    assert cli.main(["-default_F", "100", "-cell", "50", "-img", "in.img", "-oversample", "1"]) == 2
    err = capsys.readouterr().err
    assert "header PIXEL_SIZE (for -pixel)" in err and "got -0.1" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.img"]


def test_python_names_keep_working():
    """Names other code imports from the old modules."""
    import nbtorch.cli.header

    for name in ("FLAG_GROUPS", "ImageStats", "format_help", "image_statistics", "main", "missing_inputs",
                 "pixel_diagnostics", "render", "progress"):
        assert hasattr(cli, name), name
    assert callable(nbtorch.cli.header.smv_header_items) and callable(nbtorch.cli.header.header_geometry)
    assert list(cli.FLAG_GROUPS.values()) == list(SECTIONS.values())
    assert nbtorch.to_nanobragg_args is nbtorch.args.to_nanobragg_args
    assert torch.is_tensor(nbtorch.from_nanobragg_args(BASE)[0].crystal.cell)
