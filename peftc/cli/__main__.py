"""``python -m peftc.cli``: the same as the ``peftc`` command."""
import sys

from peftc.cli.commands import main

sys.exit(main())
