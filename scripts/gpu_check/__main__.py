# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""``python -m scripts.gpu_check``: see :mod:`scripts.gpu_check.cli`."""

import sys
import time

STARTED = time.monotonic()  # before the imports below (torch, MONAI): the time budget counts them too

from scripts.gpu_check.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(started=STARTED))
