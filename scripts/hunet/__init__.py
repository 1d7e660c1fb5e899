# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""2D Mamba-HUNet lesion workflow: slice transforms, lesion reports and metrics, the HTTP service and demo data."""
