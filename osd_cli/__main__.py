"""``python -m osd_cli``: the same as the ``osd-fleet`` console script."""

import sys

from osd_cli.main import main

sys.exit(main())
