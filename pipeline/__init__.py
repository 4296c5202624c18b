"""Image pipeline: detect, decode, normalise and score chest radiographs.

Pure functions over files and arrays; nothing here touches a queue or a database.
The one preprocessing path used by both training (``models``) and serving
(``worker``) is :class:`pipeline.lungs.InputPlan`: the film cut to its lung box by the lung model
(:mod:`pipeline.lungs`) where the model folder ships one, then :func:`pipeline.normalise.to_model_input`.
"""

from pipeline.errors import FailedImage, ImageProblem, IncompleteFile, RejectedImage

__all__ = ["FailedImage", "ImageProblem", "IncompleteFile", "RejectedImage"]
