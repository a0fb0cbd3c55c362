"""python -m prefork: the same command line as bin/prefork and `prefork`."""
import sys

from prefork.cli import main

sys.exit(main())
