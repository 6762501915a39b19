"""The exceptions a training run turns into a one-line message and exit status 2."""

from facecompat.checkpoint import CheckpointError
from facecompat.data.faces import NotAFaceSetError
from facecompat.data.recordio import RecordIOError
from facecompat.heads import LabelError
from facecompat.models import WeightsError

# Bad data, weights or checkpoints: the user's to fix, not a bug.
USER_ERRORS: tuple[type[Exception], ...] = (
    RecordIOError, NotAFaceSetError, LabelError, WeightsError, CheckpointError, FileNotFoundError,
)
