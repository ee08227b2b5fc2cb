"""The model file the app serves (``monai_segdiff.served.ServedModel``), with the library's errors turned
into MONAI Label exceptions that carry the HTTP status the app answers with (4xx with a clear message
instead of a 500 traceback).
"""

from __future__ import annotations

import contextlib

from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

from monai_segdiff.served import CachedPrediction, ImageMissing, ModelMissing, ModelUnusable, ServedModel, model_ts
from monai_segdiff.errors import InputError

__all__ = ["SegDiffModel", "CachedPrediction", "model_ts", "SegDiffAppError", "ModelNotFoundError",
           "ImageNotFoundError", "BadImageError", "BadModelError"]


class SegDiffAppError(MONAILabelException):
    """A MONAI Label exception with the HTTP status the server should answer."""

    status_code = 500
    code = MONAILabelError.APP_ERROR

    def __init__(self, msg: str):
        super().__init__(self.code, msg)
        self.args = (msg,)

    def __str__(self) -> str:
        return self.msg


class ModelNotFoundError(SegDiffAppError):
    status_code = 404
    code = MONAILabelError.INFERENCE_ERROR


class ImageNotFoundError(SegDiffAppError):
    status_code = 404
    code = MONAILabelError.INVALID_INPUT


class BadImageError(SegDiffAppError):
    status_code = 422
    code = MONAILabelError.INVALID_INPUT


class BadModelError(SegDiffAppError):
    status_code = 503
    code = MONAILabelError.INFERENCE_ERROR


@contextlib.contextmanager
def answered():
    """The library's errors as the app's (ordered: the specific file errors before ``InputError``)."""
    try:
        yield
    except ModelMissing as e:
        raise ModelNotFoundError(str(e)) from None
    except ImageMissing as e:
        raise ImageNotFoundError(str(e)) from None
    except ModelUnusable as e:
        raise BadModelError(str(e)) from e
    except InputError as e:
        raise BadImageError(str(e)) from e


class SegDiffModel(ServedModel):
    """``ServedModel`` answering with the app's exceptions."""

    def signature(self) -> tuple:
        with answered():
            return super().signature()

    def segmenter(self, *args, **kwargs):
        with answered():
            return super().segmenter(*args, **kwargs)

    def predict(self, *args, **kwargs) -> tuple[CachedPrediction, bool]:
        with answered():
            return super().predict(*args, **kwargs)
