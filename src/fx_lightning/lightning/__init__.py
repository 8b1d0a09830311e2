"""The Lightning layer: :class:`FuseOnExport` and what it needs from a Trainer (its batches, its networks, the CLI).

The only subpackage that imports Lightning: ``compat`` holds the Lightning internals it relies on,
``deploy_checkpoint`` writes and checks the deploy checkpoint (a Lightning checkpoint of the fused networks).
"""
