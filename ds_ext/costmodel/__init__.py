"""The step-time model: what each method sends (read from its own ``collectives()``), ring formulas,
overlap with backward. ``python -m ds_ext.costmodel`` prints projections."""
