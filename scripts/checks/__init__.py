# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Hostile-input checks of the bundle's loaders and of running services (not served by MONAI Label):
``python -m scripts.checks.hostile`` (hostile files against the bundle, the lesion service or MONAI Label) and
:mod:`scripts.checks.hostile_label` (path traversal and cross-origin requests against a MONAI Label server)."""
