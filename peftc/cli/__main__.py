"""``python -m peftc.cli``: the same as the ``peftc`` command."""
import sys

from peftc.cli.app import main

sys.exit(main())
