# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Code of the MambaClinix MONAI bundle: networks, selective-scan backends, losses, planning, data and serving."""
