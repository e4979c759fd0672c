"""``python -m repro``: see :mod:`repro.cli`."""

import sys

from repro.cli import main

sys.exit(main())
