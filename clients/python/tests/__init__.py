# Marks tests/ as a package so that `python -m unittest discover` imports its modules.

import logging

# The client logs reconnections and handler failures as warnings; in the tests they are expected,
# so they are not printed (tests that check them capture them with assertLogs).
logging.getLogger("sidebus").addHandler(logging.NullHandler())
logging.getLogger("sidebus").propagate = False
