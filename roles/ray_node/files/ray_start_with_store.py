"""`ray start` for a head whose GCS keeps its state in Redis (rayrack_gcs_ft).

Redis' password comes from the unit's credential (LoadCredential=gcs_store), so it is on no command line that
systemd or this process shows; the arguments are `ray start`'s own. Runs with the Ray venv's Python.
"""

import os
import sys
from pathlib import Path

from ray.scripts.scripts import main

password = (Path(os.environ["CREDENTIALS_DIRECTORY"]) / "gcs_store").read_text().strip()
sys.argv = ["ray", "start", *sys.argv[1:], f"--redis-password={password}"]
sys.exit(main())
