"""Face-recognition backbones with insightface arcface_torch parameter names.

    model = get_model("r50", embedding_size=512)
    load_backbone_weights(model, "ms1mv3_arcface_r50/model.pt")   # insightface model zoo, strict
    emb = model.eval()(images)                                    # [B, 3, 112, 112] -> [B, 512]

Names: ``list_models()`` (r18 r34 r50 r100 r200 mbf) and width variants ``<name>-w<float>``.
"""

from facecompat.models import iresnet, mobilefacenet  # noqa: F401  (registers the backbones)
from facecompat.models._registry import (
    ModelNameError,
    WeightsError,
    count_parameters,
    embedding_size_of,
    get_model,
    list_models,
    load_backbone_weights,
    parse_model_name,
    register_model,
)

__all__ = [
    "ModelNameError",
    "WeightsError",
    "count_parameters",
    "embedding_size_of",
    "get_model",
    "list_models",
    "load_backbone_weights",
    "parse_model_name",
    "register_model",
]
