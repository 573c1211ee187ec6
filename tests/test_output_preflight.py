"""Before sampling, `epd sample` checks that --out takes files, has room for them, and is not being written by
another epd process; each is one line and a file-system exit status, with nothing sampled."""

import errno
import shutil
from collections import namedtuple

import pytest

from epd_solver.cli import main
from epd_solver.files import FolderBusyError, check_writable, claim_folder

GMM = ["sample", "--model", "gmm:digits", "--solver", "euler", "--nfe", "3", "--seeds", "0-3", "--quiet"]


def test_check_writable_names_the_folder_and_the_fix(tmp_path, monkeypatch):
    check_writable(tmp_path, 1000)  # fine
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * 2**20, 9 * 2**20, 2**20))
    with pytest.raises(OSError, match=r"has 1.0 MiB free, the planned files need about 2.2 MiB; free some space") as e:
        check_writable(tmp_path, 2 * 2**20)
    assert e.value.errno == errno.ENOSPC
    check_writable(tmp_path, 2**19)  # half a MiB fits


def test_check_writable_refuses_a_folder_that_takes_no_file(tmp_path, monkeypatch):
    import tempfile

    def read_only(*a, **k):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(OSError, match="is not writable .*choose another folder"):
        check_writable(tmp_path)


def test_a_second_writer_of_the_same_folder_is_refused_and_the_first_is_unaffected(tmp_path, capsys):
    out = tmp_path / "samples"
    out.mkdir()
    with claim_folder(out):
        with pytest.raises(FolderBusyError, match="being written by another epd process"):
            with claim_folder(out):
                pass
        status = main(GMM + ["--out", str(out)])
        err = capsys.readouterr().err
        assert status == 3, err
        assert "being written by another epd process" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
        assert not list(out.glob("*.npy"))  # nothing sampled into the busy folder
    assert main(GMM + ["--out", str(out)]) == 0  # released: the same command now runs
    assert len(list(out.glob("*.npy"))) == 4


def test_no_room_for_the_samples_stops_before_sampling(tmp_path, monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2**20, 2**20 - 100, 100))
    out = tmp_path / "samples"
    status = main(GMM + ["--out", str(out)])
    err = capsys.readouterr().err
    assert status != 0 and "free some space or choose another folder" in err and "Traceback" not in err
    assert not list(out.glob("*.npy"))
