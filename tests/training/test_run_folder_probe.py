"""``is_locked``: the probe the sweeper uses to tell a live trial from a killed one, for both lock kinds."""

from scrimp.training.run_folder import FolderLock, is_locked


def test_is_locked_sees_exclusive_and_shared_holders_and_a_released_folder(tmp_path):
    assert not is_locked(tmp_path / "absent")
    for shared in (False, True):
        folder = tmp_path / f"shared-{shared}"
        lock = FolderLock(folder, shared=shared).acquire()
        assert is_locked(folder), f"a {'shared' if shared else 'exclusive'} holder reads as free"
        lock.release()
        assert not is_locked(folder)
