"""`python -m bastion` runs the `bastion` command line."""

import sys

from bastion.cli import main

sys.exit(main())
