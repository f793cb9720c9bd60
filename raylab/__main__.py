"""``python -m raylab``: the same as the ``raylab`` command."""

import sys

from raylab.cli import main

sys.exit(main())
