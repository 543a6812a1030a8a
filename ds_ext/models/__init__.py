"""Model constructors registered by recipe name (``model: {name: ..., <options>}``).

No torchvision import anywhere: its PyPI wheels are CUDA builds that cannot be imported next to the
CPU torch used on CPU machines, so the ResNets here are written out with torchvision's exact
parameter shapes (ResNet-50: 25,557,032 parameters), which keeps gradient sizes equal to the papers'.
"""
from . import small, resnet  # noqa: F401  (registration)
