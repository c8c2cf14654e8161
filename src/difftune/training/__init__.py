"""The training run: ``setup`` builds it, ``train_step`` advances it, ``finish`` ends it (``loop.train`` ties them).

See docs/architecture.md for the map of the modules.
"""

from difftune.compat import require_working_stack

require_working_stack()  # a known-broken install stops here, saying what to install
