"""The Lightning layer: :class:`FuseOnExport` and what it needs from a Trainer.

``callback`` holds the hooks and the decisions; ``options`` checks the callback's arguments; ``fusing`` runs one
fusion (networks, capture, fuse, verify); ``export`` writes and checks its artifacts through
:func:`fx_lightning.deploy.flow.export_and_verify`; ``summary`` reports, warns and raises; ``networks`` swaps
networks in and back; ``batches`` finds the batches and binds their inputs; ``result`` holds the report and the
state a checkpoint keeps; ``cli`` the LightningCLI. The only subpackage that imports Lightning; ``compat`` holds
the Lightning internals it relies on; ``deploy_checkpoint``
writes and checks the deploy checkpoint (a Lightning checkpoint of the fused networks).
"""
