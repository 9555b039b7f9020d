"""Model builders for the experiments: CIFAR ResNets, VGG-11 and a small CNN for 8x8 digits.

All are Keras 3 functional models, channels-last, returning logits from a Dense layer
named ``head``. Stages are nested sub-models, so layer paths read ``stage2/block1/conv2``
and ``layer_groups(model, {"stage2/*": "stage2"})`` groups a stage.
"""

from keras_hesstrace.models.resnet import cifar_resnet, resnet18, resnet34
from keras_hesstrace.models.small import small_cnn
from keras_hesstrace.models.vgg import vgg11

__all__ = ["resnet18", "resnet34", "vgg11", "cifar_resnet", "small_cnn"]
