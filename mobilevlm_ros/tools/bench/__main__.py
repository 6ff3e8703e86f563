"""`python -m mobilevlm_ros.tools.bench ...`: the same as `mobilevlm-bench ...`."""
import sys

from . import main

sys.exit(main())
