"""The training loop and what it needs: optimizers, checkpoints, validation."""

from difftune.compat import require_working_stack

require_working_stack()  # a known-broken install stops here, saying what to install
