"""The one place that touches DeepSpeed internals: ``attach`` and its step hooks, the ZeRO bridge, the
per-rank method-state file inside DeepSpeed checkpoints."""
