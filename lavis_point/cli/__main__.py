import sys

from lavis_point.cli.main import main

sys.exit(main())
