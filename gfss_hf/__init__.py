"""gfss_hf: generalized few-shot semantic segmentation on the Hugging Face stack.

Importing the package registers the model with the Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForSemanticSegmentation`, `AutoImageProcessor`) and the `few-shot-segmentation` pipeline. Registration is
idempotent.
"""

from .configuration_gfss import GFSSConfig
from .image_processing_gfss import GFSSImageProcessor
from .modeling_gfss import GFSSModel, GFSSModelOutput, GFSSPreTrainedModel
from .pipeline_few_shot_segmentation import FewShotSegmentationPipeline, register_pipeline

__version__ = "0.1.0"

__all__ = [
    "FewShotSegmentationPipeline",
    "GFSSConfig",
    "GFSSImageProcessor",
    "GFSSModel",
    "GFSSModelOutput",
    "GFSSPreTrainedModel",
    "__version__",
]


def _register() -> None:
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation

    try:
        AutoConfig.register("gfss", GFSSConfig, exist_ok=True)
    except TypeError:  # older signature without exist_ok
        AutoConfig.register("gfss", GFSSConfig)
    for auto in (AutoModel, AutoModelForSemanticSegmentation):
        try:
            auto.register(GFSSConfig, GFSSModel, exist_ok=True)
        except TypeError:
            auto.register(GFSSConfig, GFSSModel)
    # One class for both backends: it needs no torchvision, and without a "torchvision" entry the Auto class warns
    # on every load that it falls back to PIL.
    AutoImageProcessor.register(
        GFSSConfig,
        image_processor_classes={"pil": GFSSImageProcessor, "torchvision": GFSSImageProcessor},
        exist_ok=True,
    )
    # Hub export: saving copies the code files next to the weights and writes `auto_map`, so a saved folder loads
    # with `trust_remote_code=True` where gfss_hf is not installed.
    GFSSConfig.register_for_auto_class()
    GFSSModel.register_for_auto_class("AutoModel")
    GFSSImageProcessor.register_for_auto_class("AutoImageProcessor")
    register_pipeline()


_register()
