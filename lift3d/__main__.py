"""``python -m lift3d`` (what ``torchrun -m lift3d ...`` runs): the ``lift3d`` command."""

import sys

from lift3d.cli import main

sys.exit(main())
