import sys

from tokenmill.jobs.cli import main

sys.exit(main())
