import sys

from ascend_patch.cli.main import main

sys.exit(main())
