"""`python -m wz_engine ...` is the `wz` command."""

import sys

from wz_engine.cli import main

sys.exit(main())
