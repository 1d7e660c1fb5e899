# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Demo data fetched from package registries (not served by MONAI Label): ``python -m scripts.demo.data``."""
