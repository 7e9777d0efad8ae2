"""A build lock left by a killed build is removed once stale; a fresh one (a build in progress) is kept."""

import os
import time

from hotexperts.kernels import cpu_build


def test_stale_lock_removed_fresh_kept(tmp_path, capsys):
    lock = tmp_path / "lock"
    lock.touch()
    cpu_build._clear_stale_lock(tmp_path)
    assert lock.exists()
    old = time.time() - cpu_build.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    cpu_build._clear_stale_lock(tmp_path)
    assert not lock.exists()
    assert "stale build lock" in capsys.readouterr().err
    cpu_build._clear_stale_lock(tmp_path)          # no lock: nothing to do
