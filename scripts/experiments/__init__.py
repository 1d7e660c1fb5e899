# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Experiments run with the bundle's own workflows (not served by MONAI Label): the loss ablation
(``python -m scripts.experiments.ablation_loss``, see docs/ablation_loss.md)."""
