"""Entry-point payload read by lmms-eval's model registry (``lmms_eval.models`` group)."""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(
    model_id="visionzip",
    simple_class_path="visionzip_eval.lmms.adapter.VisionZipLMM",
    aliases=("visionzip_llava",),
)
