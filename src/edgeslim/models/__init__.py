"""Model zoo and loaders.

>>> model = edgeslim.models.load("mobilenet_v2", dataset="fashion-mnist", pretrained=True)
"""

from edgeslim.core.detection import detect_postprocess
from edgeslim.models._detect import YoloMobileNetV2
from edgeslim.models._text import load_text, mean_pool, text_model_names
from edgeslim.models._zoo import (
    ZOO,
    SmallCNN,
    apply_state_dict,
    build,
    checkpoint_info,
    checkpoint_path,
    init_from_imagenet,
    load,
    load_factory,
    load_state_dict_file,
    names,
    shipped,
)

__all__ = [
    "ZOO",
    "SmallCNN",
    "YoloMobileNetV2",
    "apply_state_dict",
    "build",
    "checkpoint_info",
    "checkpoint_path",
    "detect_postprocess",
    "init_from_imagenet",
    "load",
    "load_factory",
    "load_state_dict_file",
    "names",
    "shipped",
    "load_text",
    "mean_pool",
    "text_model_names",
]
