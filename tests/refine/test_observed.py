"""refine.targets.observed.read_observed: the one reader of observed images for every refine entry — errors named by the
entry's label, the model's size enforced, header values compared with the model in every mode (single, joint,
independent result lines)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import nbtorch
import nbtorch.io as nio
from nbtorch.io.images import HeaderWarning
from refine.imagelist import load_entries, parse_image_list
from refine.targets.observed import read_observed
from refine.scaleout import RESULT_KEYS, refine_one

from .test_many import TINY


@pytest.fixture
def header_image(tmp_path):
    """An SMV still of TINY's size whose header says distance 95 mm (the model: 60 mm) and its model."""
    p, s = nbtorch.from_nanobragg_args(TINY)
    img = np.clip(nbtorch.simulate(p, s).numpy(), 0, 65535).astype(np.uint16) + 1
    path = tmp_path / "still.img"
    nio.write_smv(path, img, [("PIXEL_SIZE", repr(s.pixel_size)), ("DISTANCE", "95"),
                              ("WAVELENGTH", repr(float(p.beam.wavelength)))])
    return str(path), p, s


def test_header_disagreement_is_one_warning_naming_label_and_both_values(header_image):
    path, p, s = header_image
    with pytest.warns(HeaderWarning) as record:
        obs = read_observed(path, s, p, label="OBSERVED")
    assert obs.data.shape == (s.spixels, s.fpixels)
    (line,) = [str(w.message) for w in record]
    assert line.startswith(f"OBSERVED {path}") and "95" in line and "-distance 60" in line
    with warnings.catch_warnings(record=True) as caught:  # without params nothing is compared
        warnings.simplefilter("always")
        read_observed(path, s)
    assert not [w for w in caught if issubclass(w.category, HeaderWarning)]


def test_errors_are_one_line_starting_with_the_label(header_image, tmp_path):
    path, p, s = header_image
    other = s.replace(fpixels=s.fpixels + 2)
    with pytest.raises(ValueError, match=r"^LIST line 3: .*still\.img is \d+×\d+ pixels .* but the flags describe"):
        read_observed(path, other, label="LIST line 3:")
    bad = tmp_path / "cut.img"
    bad.write_bytes(open(path, "rb").read()[:300])
    with pytest.raises(ValueError) as err:
        read_observed(str(bad), s, label="OBSERVED")
    assert str(err.value).startswith(f"OBSERVED {bad}") and "\n" not in str(err.value)


def test_joint_and_independent_modes_compare_headers_too(header_image, tmp_path):
    path, p, s = header_image
    lst = tmp_path / "one.lst"
    lst.write_text(f"still.img {TINY}\n")
    entries = parse_image_list(str(lst))
    with pytest.warns(HeaderWarning, match=r"one\.lst line 1: .*still\.img"):
        load_entries(entries)
    rec = refine_one(entries[0], ["scale"], {"coarse_to_fine": False, "max_iter": 2})
    assert "error" not in rec and set(rec) == set(RESULT_KEYS), rec.get("error")
    assert len(rec["warnings"]) == 1 and "-distance 60" in rec["warnings"][0]
