"""Test-session settings that must exist before any test module imports Ray."""

import os
import sys
from pathlib import Path

# Ray reads its auth mode at import: the session cluster (tests/test_ray.py) runs with token auth,
# so this process, as a driver, must too.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).parent))  # the tests' helper modules (reference, service_data)
