# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""MONAI Label backend: preparing the ``monaibundle`` sample app with this bundle and starting the server
(see docs/monailabel.md)."""
