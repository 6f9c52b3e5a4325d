"""The main job on built-in defaults: simulate a still diffraction image with nbtorch and write it with a picture.

Run ``nbtorch-demo [--out DIR]``.  Writes ``DIR/image.bin`` (float32 photons/pixel, [slow, fast]),
``DIR/image.img`` (SMV with Poisson noise), ``DIR/image.png`` and ``DIR/summary.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

import nbtorch

DEMO_ARGS = (
    "-cell 52 61 73 90 90 90 -misset 12 -25 31 -default_F 100 -N 8 -lambda 1.0 -distance 80 -pixel 0.2 "
    "-detpixels 256 -oversample 1 -mosaic 0.2 -mosaic_domains 5 -polar 0.95 -water 0.3 -fluence 1e28"
)


def save_picture(path: str, images, titles, cmap="gray_r") -> None:
    """Write a PNG of one or more ``[slow, fast]`` images side by side (log-scaled photons)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(images), figsize=(4.2 * len(images), 4.2), squeeze=False)
    for ax, img, title in zip(axes[0], images, titles):
        im = ax.imshow(np.log1p(np.clip(img, 0, None)), cmap=cmap, origin="upper")
        ax.set_title(title)
        ax.set_xlabel("fast (pixels)")
        ax.set_ylabel("slow (pixels)")
        fig.colorbar(im, ax=ax, fraction=0.046, label="log(1 + photons)")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="nbtorch-demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="nbtorch-demo", help="output folder (default nbtorch-demo)")
    ap.add_argument("--seed", type=int, default=1, help="noise seed (default 1)")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    from nbtorch.io import write_raw_float, write_smv
    from nbtorch.noise import noise_image_uint16

    t0 = time.perf_counter()
    params, setup = nbtorch.from_nanobragg_args(DEMO_ARGS)
    image = nbtorch.simulate(params, setup).numpy()
    t_sim = time.perf_counter() - t0
    noisy, overloads = noise_image_uint16(image.astype(np.float32), seed=a.seed, adc=0.0)
    write_raw_float(os.path.join(a.out, "image.bin"), image)
    write_smv(os.path.join(a.out, "image.img"), noisy, {"PIXEL_SIZE": setup.pixel_size, "WAVELENGTH": 1.0})
    save_picture(os.path.join(a.out, "image.png"), [image, noisy.astype(float)], ["model (photons)", "with Poisson noise"])
    summary = {
        "nanobragg_args": DEMO_ARGS,
        "shape_slow_fast": list(image.shape),
        "max_photons": float(image.max()),
        "mean_photons": float(image.mean()),
        "total_photons": float(image.sum()),
        "simulate_seconds": round(t_sim, 3),
    }
    with open(os.path.join(a.out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    print(f"simulated {image.shape[1]}×{image.shape[0]} pixels in {t_sim:.2f} s: max {image.max():.1f} photons, "
          f"mean {image.mean():.2f}; wrote {a.out}/image.bin, image.img, image.png, summary.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
