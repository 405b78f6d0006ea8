import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from installed import build_vmsd_wheel  # found through the path set just above


@pytest.fixture(scope="session")
def vmsd_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vmsd's wheel built from this checkout, once for every test that installs it."""
    return build_vmsd_wheel(tmp_path_factory.mktemp("dist"))
