"""``python -m maskdiff.cli``: the same as the ``maskdiff`` command."""

import sys

from maskdiff.cli import main

sys.exit(main())
