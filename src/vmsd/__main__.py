import sys

from vmsd.cli import main

sys.exit(main())
