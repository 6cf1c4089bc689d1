import sys

from imp_jax.server import main

sys.exit(main())
