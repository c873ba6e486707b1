from __future__ import annotations

import pytest

# Many tiny steps: thread hand-offs would dominate (and hurt a shared machine).
pytestmark = pytest.mark.usefixtures("one_thread")
