import sys

from imp_jax.cli import main  # `imp-jax serve`: bad input is one line, not a traceback

sys.exit(main(["serve", *sys.argv[1:]]))
