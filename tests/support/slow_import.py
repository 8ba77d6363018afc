"""A module that takes `SLOW_IMPORT_S` seconds (default 30) to import: a forker's imports that are still running."""

import os
import time

time.sleep(float(os.environ.get("SLOW_IMPORT_S", "30")))
