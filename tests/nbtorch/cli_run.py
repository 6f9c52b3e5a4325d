"""Running ``nbtorch``'s command line in a test: one place for the output names the CLI tests read back."""
from __future__ import annotations

from nbtorch import cli


def run_cli(argv, capsys, name="run"):
    """Run the CLI writing ``name``.bin/.img/_noise.img in the current folder → (rc, stdout, stderr)."""
    rc = cli.main([*map(str, argv), "-floatfile", f"{name}.bin", "-intfile", f"{name}.img",
                   "-noisefile", f"{name}_noise.img"])
    out, err = capsys.readouterr()
    return rc, out, err
