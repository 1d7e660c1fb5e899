# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Test set-up: the bundle root on sys.path (configs reach the code as ``scripts.xxx``), few threads."""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, os.cpu_count() or 1))
