"""The hardneg HTTP service: similarity search over the newest snapshot of a store, with hot reload.

The app factory is :func:`hardneg.api.main.create_app`. This package imports
``hardneg.miner`` and never ``hardneg.trainer``: raw inputs are embedded by the
snapshot's own exported model. Nothing is imported here, so that ``hardneg``
subcommands other than ``serve`` do not pay for importing FastAPI.
"""
