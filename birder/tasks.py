"""What a model is for. Stored in model files as its plain string value (``"image_classification"``...)."""

from enum import StrEnum


class Task(StrEnum):
    IMAGE_CLASSIFICATION = "image_classification"
    OBJECT_DETECTION = "object_detection"
    MASKED_IMAGE_MODELING = "masked_image_modeling"
    SELF_SUPERVISED_LEARNING = "self_supervised_learning"


# A plain str, not the enum member: it goes into checkpoints, which load with weights_only=True.
DEFAULT_TASK: str = Task.IMAGE_CLASSIFICATION.value
