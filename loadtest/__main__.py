"""``python -m loadtest`` is ``talkbridge-load``."""

import sys

from loadtest.cli import main

sys.exit(main())
