"""Training the heads: dataset readers, training tiles and their token cache, augmentation, the
frozen-backbone and end-to-end loops, and the ``train`` / ``segment`` CLI commands."""

# the modules are the API (cellvit_optimus.engine.training.train, ...); the package itself exports nothing
__all__: tuple[str, ...] = ()
