"""``python -m repro``: see :mod:`repro.pipeline.cli`."""

import sys

from repro.pipeline.cli import main

sys.exit(main())
