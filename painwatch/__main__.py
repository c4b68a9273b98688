import sys

from painwatch.cli import main

sys.exit(main())
