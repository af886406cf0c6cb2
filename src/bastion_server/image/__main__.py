"""``python -m bastion_server.image build|show``: the image commands without the SDK's CLI."""

import sys

from bastion_server.image.cli import main

sys.exit(main())
