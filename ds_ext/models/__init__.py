"""Model constructors registered by recipe name (``model: {name: ..., <options>}``).

No torchvision import anywhere: its PyPI wheels are CUDA builds that cannot be imported next to the
CPU torch used on CPU machines, so the ResNets here are written out with torchvision's exact
parameter shapes (ResNet-50: 25,557,032 parameters), which keeps gradient sizes equal to the papers'.
The same holds for WRN-50-2 (68,883,240) and ViT-B/16 (86,567,656).

Modules: ``small`` (digits_cnn, mlp), ``resnet`` (resnet18..152; ``small_input`` for CIFAR), ``wrn``
(wrn26_10, wide_resnet50_2: DS-Sync), ``vgg`` (vgg_cifar: ExDyna), ``vit`` (vit_b16, vit_tiny: QSR),
``lstm_lm`` (WikiText-2 LSTM: ExDyna, D-GraB), ``recsys`` (ncf: ExDyna; deepfm: DS-Sync).
Factories whose sizes depend on the data (lstm_lm, ncf, deepfm) also accept ``data=<DataBundle>`` and
check or fill those sizes from it.
"""
from . import small  # noqa: F401  (registration)
from . import resnet
from . import wrn
from . import vgg
from . import vit
from . import lstm_lm
from . import recsys
from . import gpt
