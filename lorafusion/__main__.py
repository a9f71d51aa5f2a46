"""``python -m lorafusion`` = the ``lorafusion`` command."""

import sys

from .cli import main

sys.exit(main())
