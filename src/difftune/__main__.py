import sys

from difftune.cli import main

sys.exit(main())
