"""The application layer: the ``ds-ext`` trainer, recipes, run records, the checkpoint store, faults."""
