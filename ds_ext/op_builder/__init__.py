"""DeepSpeed OpBuilder subclasses for the compressed-allreduce kernels (not built yet: every method
currently runs its torch implementation; see the README's status table)."""
