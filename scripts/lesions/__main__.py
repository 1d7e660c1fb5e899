# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""``python -m scripts.lesions``: the same as ``python -m scripts.lesions.generate``."""

import sys

from scripts.lesions.generate import main

sys.exit(main())
