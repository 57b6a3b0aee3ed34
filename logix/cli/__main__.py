"""`python -m logix.cli`: the `logix` command."""

import sys

from logix.cli import main

sys.exit(main())
