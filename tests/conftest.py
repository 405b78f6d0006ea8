import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fds import open_fds  # found through the path set just above
from installed import build_vmsd_wheel
from private_peers import PRIVATE_QEMUS, Peer


@pytest.fixture(scope="session")
def vmsd_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vmsd's wheel built from this checkout, once for every test that installs it."""
    return build_vmsd_wheel(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="session", params=list(PRIVATE_QEMUS))
def private_peer(request: pytest.FixtureRequest) -> Peer:
    """Each QEMU in a private folder (10.0, 11.1) in turn, fetched when missing: its tests are never skipped."""
    return Peer.fetched(request.param)


@pytest.fixture
def no_leaked_fds() -> Iterator[None]:
    """Fail a test that leaves a descriptor open (modules that handle descriptors use it for every test)."""
    before = open_fds()
    yield
    leaked = open_fds() - before
    assert not leaked, {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")}


@pytest.fixture
def shm() -> Iterator[Path]:
    """A folder under /dev/shm for guest RAM files both QEMUs map (memory-backend-file,share=on), removed after."""
    d = Path("/dev/shm") / f"vmsd-test-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    yield d
    for f in d.iterdir():
        f.unlink()
    d.rmdir()
