"""The compiled kernels' cache on a read-only install run by a user without a writable home: numba kept none and
every start compiled again; edge_runtime.numba_cache names a private folder instead."""

from __future__ import annotations

import os

from edge_runtime import numba_cache


def test_a_writable_install_or_home_keeps_numbas_own_choice():
    assert numba_cache.fallback_cache_dir(lambda p: True) is None
    home_only = numba_cache.user_cache()
    assert numba_cache.fallback_cache_dir(lambda p: p == home_only) is None


def test_nowhere_writable_gets_a_private_folder(tmp_path):
    found = numba_cache.fallback_cache_dir(lambda p: False, roots=(tmp_path / "no-var-tmp", tmp_path))
    assert found == tmp_path / f"edge-runtime-numba-{os.getuid()}"
    assert found.is_dir() and (found.stat().st_mode & 0o777) == 0o700


def test_a_folder_others_can_write_is_refused(tmp_path):
    """numba loads pickled code from its cache: a folder another user could write to is never named."""
    planted = tmp_path / f"edge-runtime-numba-{os.getuid()}"
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)
    assert numba_cache.private_folder(tmp_path) is None
    planted.chmod(0o700)
    assert numba_cache.private_folder(tmp_path) == planted
    link = tmp_path / "other"
    link.mkdir()
    (link / f"edge-runtime-numba-{os.getuid()}").symlink_to(planted)
    assert numba_cache.private_folder(link) is None  # a symlink planted in its place
