import sys

from rayrack.cli import main

sys.exit(main())
