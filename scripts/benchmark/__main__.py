# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""``python -m scripts.benchmark``: see :mod:`scripts.benchmark.cli`."""

from scripts.benchmark.cli import main

if __name__ == "__main__":
    main()
