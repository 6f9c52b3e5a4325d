"""Issue 18 item 2: one safe-output rule for every writer (nbtorch.io.safe_output, atomic_write).

A hypothesis fuzzer over output/input path combinations (same file, hard link, symlink to an input or to another
output, FIFO, ``os.devnull``, read-only file and folder, missing folder, directory, socket, symlink loop) drives the
check every command line uses and then the writer: no input is ever modified, no special file or symlink is replaced,
and every refusal is one line naming the option and the path.  Then the issue's cases through ``nbtorch`` itself.

Runs as root and as a normal user: ``os.access`` passes every permission check for root, so a read-only file or
folder is refused for a user and written (never an input) for root (``ROOT`` is probed, so root without
CAP_DAC_OVERRIDE, e.g. ``setpriv --bounding-set=-dac_override,-dac_read_search``, counts as a user).
"""
from __future__ import annotations

import contextlib
import os
import socket
import stat
import tempfile
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbtorch import cli
from nbtorch.io import OutputRefused, atomic_write, check_output_folder, check_output_paths, output_target
from nbtorch.io import write_smv
from nbtorch.io.safe_output import STREAM
from nbtorch.io._atomic import _UMASK



def _permissions_ignored() -> bool:
    """True for root (with CAP_DAC_OVERRIDE): os.access passes a read-only file as writable."""
    with tempfile.TemporaryDirectory() as d:
        probe = os.path.join(d, "probe")
        open(probe, "w").close()
        os.chmod(probe, 0o444)
        return os.access(probe, os.W_OK)


ROOT = _permissions_ignored()
#: A tiny nbtorch run (8×8 pixels): a fraction of a second.
RUN = ["-cell", "20", "20", "20", "90", "90", "90", "-N", "2", "-distance", "50", "-detpixels", "8", "-oversample",
       "1", "-nopgm", "-nonoise", "-noprogress"]

# ---------------------------------------------------------------------------------------------------------------
# the fuzzer

#: Output kinds: how an output path relates to the inputs, the other outputs and the file system.
KINDS = ("new", "existing", "input", "input_dotdot", "hardlink_input", "symlink_input", "symlink_prev", "dangling",
         "fifo", "devnull", "readonly_file", "readonly_dir", "missing_dir", "directory", "socket", "loop")
#: Kinds the rule must refuse whatever the user (same file as an input, not writable as a file).
ALWAYS_REFUSED = {"input", "input_dotdot", "hardlink_input", "symlink_input", "missing_dir", "directory", "socket",
                  "loop"}


class Scene:
    """A folder with two inputs and the outputs of the drawn kinds; records what must never change."""

    def __init__(self, root: str, kinds):
        self.root = root
        self.inputs = [("-hkl", self._file("in.hkl", b"0 0 0 10\n")), ("-mask", self._file("mask.img", b"MASK"))]
        self.outputs = []
        for k, kind in enumerate(kinds):
            self.outputs.append((f"-out{k}", self._make(kind, k)))
        self.kinds = list(kinds)
        self.before = {p: self._state(p) for p in self._watched()}

    def _file(self, name: str, data: bytes, mode: int = 0o644) -> str:
        path = os.path.join(self.root, name)
        with open(path, "wb") as fh:
            fh.write(data)
        os.chmod(path, mode)
        return path

    def _make(self, kind: str, k: int) -> str:
        p = os.path.join(self.root, f"o{k}")
        inp = self.inputs[k % 2][1]
        if kind == "existing":
            return self._file(f"o{k}", b"old output", 0o4755)  # setuid: must not survive a replacement
        if kind == "input":
            return inp
        if kind == "input_dotdot":
            os.makedirs(os.path.join(self.root, "sub"), exist_ok=True)
            return os.path.join(self.root, "sub", "..", os.path.basename(inp))
        if kind == "hardlink_input":
            os.link(inp, p)
        elif kind == "symlink_input":
            os.symlink(inp, p)
        elif kind == "symlink_prev":
            os.symlink(self.outputs[-1][1] if self.outputs else os.path.join(self.root, "target_new"), p)
        elif kind == "dangling":
            os.symlink(os.path.join(self.root, f"t{k}"), p)
        elif kind == "fifo":
            os.mkfifo(p)
        elif kind == "devnull":
            return os.devnull
        elif kind == "readonly_file":
            return self._file(f"o{k}", b"read-only", 0o444)
        elif kind == "readonly_dir":
            d = os.path.join(self.root, f"ro{k}")
            os.mkdir(d)
            os.chmod(d, 0o555)
            return os.path.join(d, "out")
        elif kind == "missing_dir":
            return os.path.join(self.root, "nodir", "out")
        elif kind == "directory":
            os.mkdir(p)
        elif kind == "socket":
            with contextlib.closing(socket.socket(socket.AF_UNIX)) as s:
                s.bind(p)
        elif kind == "loop":
            os.symlink(p, p)
        return p

    def _watched(self):
        paths = [p for _, p in self.inputs] + [p for _, p in self.outputs]
        return sorted({os.path.normpath(p) for p in paths})

    @staticmethod
    def _state(path: str):
        try:
            st_ = os.lstat(path)
        except FileNotFoundError:
            return None
        data = None
        if stat.S_ISREG(st_.st_mode):
            with open(path, "rb") as fh:
                data = fh.read()
        return stat.S_IFMT(st_.st_mode), st_.st_ino, data, stat.S_IMODE(st_.st_mode)

    def assert_no_input_changed(self):
        for _, p in self.inputs:
            assert self._state(p) == self.before[os.path.normpath(p)], p

    def assert_specials_kept(self):
        """Every FIFO, device, socket, directory and symlink is still itself (same type and inode)."""
        for p, old in self.before.items():
            if old is not None and old[0] != stat.S_IFREG:
                new = self._state(p)
                assert new is not None and new[:2] == old[:2], p


def _write_all(outputs, payload: bytes):
    """atomic_write every output; a FIFO gets a reader thread started just before its write.  → bytes read from
    each FIFO."""
    read = {}
    for _, path in outputs:
        target, kind = output_target(path)
        thread = None
        if kind == STREAM and stat.S_ISFIFO(os.stat(target).st_mode):
            def reader(t=target):
                with open(t, "rb") as fh:
                    read[t] = fh.read()
            thread = threading.Thread(target=reader, daemon=True)
            thread.start()
        atomic_write(path, payload)
        if thread is not None:
            thread.join(10)
            assert not thread.is_alive()
    return read


# NBTORCH_FUZZ_EXAMPLES raises the example count for a longer local run (2000 examples: about 20 s)
@settings(max_examples=int(os.environ.get("NBTORCH_FUZZ_EXAMPLES", "120")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=3))
def test_fuzz_outputs_never_destroy_inputs_or_special_files(kinds):
    with tempfile.TemporaryDirectory() as root:
        scene = Scene(root, kinds)
        try:
            check_output_paths(scene.outputs, scene.inputs)
        except OutputRefused as exc:
            msg = str(exc)
            assert "\n" not in msg and any(msg.startswith(f"{n} {p}:") for n, p in scene.outputs), msg
            scene.assert_no_input_changed()
            scene.assert_specials_kept()
            return
        finally:
            for name in os.listdir(root):  # let TemporaryDirectory clean up read-only folders
                if name.startswith("ro"):
                    os.chmod(os.path.join(root, name), 0o755)
        assert not ALWAYS_REFUSED & set(kinds), kinds
        if not ROOT:
            assert not {"readonly_file", "readonly_dir"} & set(kinds), kinds
        fifos = _write_all(scene.outputs, b"payload")
        scene.assert_no_input_changed()
        scene.assert_specials_kept()
        assert all(v == b"payload" for v in fifos.values())
        for (_, path), kind in zip(scene.outputs, kinds):
            target = os.path.realpath(path)
            if not stat.S_ISREG(os.stat(target).st_mode):  # a FIFO or /dev/null, maybe through a link: checked above
                continue
            with open(target, "rb") as fh:
                assert fh.read() == b"payload", kind
            mode = stat.S_IMODE(os.stat(target).st_mode)
            assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX)
            if kind in ("new", "dangling"):
                assert mode == 0o666 & ~_UMASK
        assert not [n for n in os.listdir(root) if n.endswith(".tmp")]


def test_expected_verdicts_of_each_kind_alone_and_paired():
    """Each kind alone: refused exactly when the rule says (read-only ones: as a user only); a repeated output is
    refused, except a character device such as /dev/null."""
    for kind in KINDS:
        with tempfile.TemporaryDirectory() as root:
            scene = Scene(root, [kind])
            refused = kind in ALWAYS_REFUSED or (not ROOT and kind.startswith("readonly"))
            try:
                check_output_paths(scene.outputs, scene.inputs)
                assert not refused, kind
            except OutputRefused:
                assert refused, kind
            finally:
                for name in os.listdir(root):
                    if name.startswith("ro"):
                        os.chmod(os.path.join(root, name), 0o755)
    check_output_paths([("-floatfile", os.devnull), ("-intfile", os.devnull)])
    with tempfile.TemporaryDirectory() as root:
        fifo = os.path.join(root, "f")
        os.mkfifo(fifo)
        with pytest.raises(OutputRefused, match="the same file as the output -floatfile"):
            check_output_paths([("-floatfile", fifo), ("-intfile", fifo)])
        with pytest.raises(OutputRefused, match="the same file as the input -img"):
            check_output_paths([("-floatfile", os.devnull)], [("-img", os.devnull)])


# ---------------------------------------------------------------------------------------------------------------
# the writer


def test_atomic_write_through_symlink_keeps_the_link(tmp_path):
    target = tmp_path / "real.bin"
    target.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to("real.bin")
    atomic_write(link, b"new")
    assert link.is_symlink() and os.readlink(link) == "real.bin" and target.read_bytes() == b"new"
    dangling = tmp_path / "dangling.bin"
    dangling.symlink_to("made.bin")
    atomic_write(dangling, b"made")
    assert dangling.is_symlink() and (tmp_path / "made.bin").read_bytes() == b"made"


def test_atomic_write_into_a_fifo_and_devnull_writes_in_place(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    atomic_write(fifo, b"x" * 200_000)  # more than a pipe buffer: written in pieces
    reader.join(10)
    assert got == [b"x" * 200_000] and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    before = os.stat(os.devnull)
    atomic_write(os.devnull, b"discarded")
    after = os.stat(os.devnull)
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("kind", ["directory", "socket", "loop"])
def test_atomic_write_refuses_what_it_cannot_write_in_place(tmp_path, kind):
    p = tmp_path / "out"
    if kind == "directory":
        p.mkdir()
    elif kind == "socket":
        with contextlib.closing(socket.socket(socket.AF_UNIX)) as s:
            s.bind(str(p))
    else:
        p.symlink_to(p.name)
    before = os.lstat(p)
    with pytest.raises(OSError, match=kind.replace("loop", "symlink loop")):
        atomic_write(p, b"data")
    after = os.lstat(p)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)


def test_replaced_file_keeps_permission_bits_never_setuid(tmp_path):
    p = tmp_path / "tool"
    p.write_bytes(b"old")
    p.chmod(0o6755)
    atomic_write(p, b"new")
    assert stat.S_IMODE(p.stat().st_mode) == 0o755 and p.read_bytes() == b"new"
    q = tmp_path / "new"
    atomic_write(q, b"n")
    assert stat.S_IMODE(q.stat().st_mode) == 0o666 & ~_UMASK


def test_check_output_folder(tmp_path):
    assert check_output_folder("--plots", tmp_path) is True
    assert check_output_folder("--plots", tmp_path / "a" / "b") is False
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputRefused, match=r"^--plots .*file: not a directory"):
        check_output_folder("--plots", tmp_path / "file")
    with pytest.raises(OutputRefused, match="cannot be made"):
        check_output_folder("--plots", tmp_path / "file" / "sub")


# ---------------------------------------------------------------------------------------------------------------
# the cases through nbtorch


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.hkl").write_text("0 0 0 10\n1 0 0 5\n")
    return tmp_path


def _refused(capsys, argv, words):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("nbtorch: error: "), err
    for w in words:
        assert w in err, err
    return err


def test_nbtorch_floatfile_onto_the_hkl_input_is_refused(folder, capsys):
    before = (folder / "in.hkl").read_bytes()
    _refused(capsys, RUN + ["-hkl", "in.hkl", "-floatfile", "in.hkl"], ["-floatfile in.hkl", "the input -hkl in.hkl"])
    (folder / "link.bin").symlink_to("in.hkl")
    os.link(folder / "in.hkl", folder / "hard.bin")
    _refused(capsys, RUN + ["-hkl", "in.hkl", "-intfile", "link.bin"], ["-intfile link.bin", "-hkl"])
    _refused(capsys, RUN + ["-hkl", "hard.bin", "-floatfile", "in.hkl"], ["-floatfile in.hkl", "-hkl hard.bin"])
    assert (folder / "in.hkl").read_bytes() == before and (folder / "link.bin").is_symlink()
    assert sorted(p.name for p in folder.iterdir()) == ["hard.bin", "in.hkl", "link.bin"]


def test_nbtorch_intfile_onto_the_mask_is_refused(folder, capsys):
    write_smv(folder / "mask.img", np.ones((8, 8), np.uint16), {"PIXEL_SIZE": 0.1, "DISTANCE": 50.0,
                                                                  "WAVELENGTH": 1.0})
    before = (folder / "mask.img").read_bytes()
    _refused(capsys, RUN + ["-default_F", "1", "-mask", "mask.img", "-intfile", "mask.img"],
             ["-intfile mask.img", "the input -mask mask.img"])
    # a default output name is an output too: -img intimage.img would be overwritten by the default -intfile
    (folder / "intimage.img").write_bytes(before)
    _refused(capsys, RUN + ["-default_F", "1", "-img", "intimage.img"], ["-intfile intimage.img", "-img"])
    assert (folder / "mask.img").read_bytes() == before == (folder / "intimage.img").read_bytes()


def test_nbtorch_two_outputs_on_one_file_are_refused(folder, capsys):
    pytest.importorskip("h5py")
    _refused(capsys, RUN + ["-default_F", "1", "-floatfile", "X", "-nexusfile", "X"],
             ["-nexusfile X", "the same file as the output -floatfile X"])
    _refused(capsys, RUN + ["-default_F", "1", "-floatfile", "a.bin", "-intfile", "./a.bin"], ["-intfile ./a.bin"])
    assert sorted(p.name for p in folder.iterdir()) == ["in.hkl"]


@pytest.mark.parametrize("make, words", [
    (lambda p: p.mkdir(), ["is a directory"]),
    (lambda p: None, []),
])
def test_nbtorch_directory_and_missing_folder_refused_before_work(folder, capsys, monkeypatch, make, words):
    monkeypatch.setattr(cli, "_simulate", lambda *a: pytest.fail("simulated before the output check"))
    make(folder / "d")
    out = "d" if words else "nodir/f.bin"
    _refused(capsys, RUN + ["-default_F", "1", "-floatfile", out], [f"-floatfile {out}"] + (words or ["nodir"]))


def test_nbtorch_writes_through_devices_fifos_and_symlinks(folder, capsys):
    fifo = folder / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    (folder / "link.img").symlink_to("target.img")
    rc = cli.main(RUN + ["-default_F", "1", "-floatfile", str(fifo), "-intfile", "link.img"])
    reader.join(10)
    assert rc == 0, capsys.readouterr().err
    assert len(got) == 1 and len(got[0]) == 8 * 8 * 4 and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert (folder / "link.img").is_symlink() and (folder / "target.img").stat().st_size > 512
    rc = cli.main(RUN + ["-default_F", "1", "-floatfile", os.devnull, "-intfile", os.devnull])
    assert rc == 0 and stat.S_ISCHR(os.stat(os.devnull).st_mode)


@pytest.mark.skipif(ROOT, reason="root may write any file (os.access passes)")
def test_nbtorch_read_only_output_refused_for_a_user(folder, capsys):
    (folder / "ro.bin").write_bytes(b"keep")
    (folder / "ro.bin").chmod(0o444)
    _refused(capsys, RUN + ["-default_F", "1", "-floatfile", "ro.bin"], ["-floatfile ro.bin", "not writable"])
    assert (folder / "ro.bin").read_bytes() == b"keep"


@pytest.mark.parametrize("switches", [[], ["-nopgm"], ["-nonoise", "-pgmfile", "p.pgm"], ["-nopgm", "-pgmfile", "q"]])
def test_output_files_are_what_the_command_line_writes(folder, capsys, switches):
    """The list the check is given (nbtorch.args.build.output_files) is the list of files written."""
    from nbtorch.args import parse_args
    from nbtorch.args.build import output_files

    flags = [f for f in RUN if f not in ("-nopgm", "-nonoise")] + ["-default_F", "1", "-seed", "1"] + switches
    assert cli.main(flags) == 0
    written = capsys.readouterr().out.rsplit("files written: ", 1)[1].strip().split(", ")
    assert written == [name for _, name in output_files(parse_args(flags))]
