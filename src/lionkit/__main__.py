"""``python -m lionkit COMMAND``: the same as the ``lionkit`` console script."""

import sys

from .cli import main

sys.exit(main())
