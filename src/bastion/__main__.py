"""``python -m bastion`` (and ``torchrun ... -m bastion train ...``): the ``bastion`` command."""

import sys

from bastion.cli import main

sys.exit(main())
