"""``python -m signaling serve …``."""

from signaling.cli import main

raise SystemExit(main())
