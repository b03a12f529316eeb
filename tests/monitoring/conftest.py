"""The repository root on sys.path: the monitoring package (dashboards, sync) is not installed."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
