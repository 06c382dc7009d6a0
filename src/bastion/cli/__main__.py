"""``python -m bastion.cli``: the same as the ``bastion`` command."""

import sys

from bastion.cli import main

sys.exit(main())
