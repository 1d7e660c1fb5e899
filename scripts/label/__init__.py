# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""MONAI Label backend: the transforms ``configs/inference.yaml`` uses (``compat``), preparing the ``monaibundle``
sample app with this bundle (``app``) and starting the server behind a request guard (``server``, ``guard``);
see docs/monailabel.md. Importing the package imports none of its modules (``compat`` needs only monai and torch)."""
