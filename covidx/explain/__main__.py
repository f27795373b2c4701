import sys

from covidx.explain.cli import main

sys.exit(main())
