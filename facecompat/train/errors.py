"""The exceptions a training run turns into a one-line message and exit status 2."""

from facecompat.checkpoint import CheckpointError
from facecompat.data.faces import NotAFaceSetError
from facecompat.data.recordio import RecordIOError
from facecompat.errors import UserError
from facecompat.heads import LabelError
from facecompat.models import WeightsError


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (diverged, bad resume point); the message says where and what to do."""


# Bad data, weights or checkpoints: the user's to fix, not a bug.
USER_ERRORS: tuple[type[Exception], ...] = (
    RecordIOError, NotAFaceSetError, LabelError, WeightsError, CheckpointError, FileNotFoundError,
)
