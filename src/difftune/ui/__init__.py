"""``difftune ui``: a local web app over the same library as the CLI.

Data checks call :mod:`difftune.data.report`, configs are validated by the config loader, runs are
``difftune train`` processes started from a queue on disk, and every page reads the run folders
those processes (or a ``difftune train`` started from a terminal) write.
"""
