"""`python -m ray_resnet ...` is the `ray-resnet` command."""

import sys

from ray_resnet.apps.cli import main

sys.exit(main())
