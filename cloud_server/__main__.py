import sys

from cloud_server.cli import main

sys.exit(main())
