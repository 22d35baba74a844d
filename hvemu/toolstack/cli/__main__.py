"""``python -m hvemu.toolstack.cli``: the ``hvemu`` command."""

import sys

from hvemu.toolstack.cli import main

sys.exit(main())
