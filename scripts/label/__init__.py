# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""MONAI Label backend: preparing the ``monaibundle`` sample app with this bundle (``app``), starting the server
behind a request guard (``server``, ``guard``) and probing a running server with hostile requests (``hostile``);
see docs/monailabel.md."""
