"""``python -m spark3d.cli``: the same as the ``spark3d`` command."""

import sys

from . import main

sys.exit(main())
