"""dcar's command-line scripts: ``python scripts/<name>.py key=value ...`` in a checkout (``scripts`` links here),
``dcar <name> key=value ...`` (or ``python -m dcar <name>``) wherever the package is installed (:mod:`dcar.__main__`).
Each is a thin layer over the package: a typed config, :func:`dcar.config.load_config`, then library calls."""
