"""``python -m influenciae.cli``: the console script."""

import sys

from influenciae.cli import main

sys.exit(main())
