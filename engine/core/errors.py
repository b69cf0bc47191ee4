"""The one error hierarchy of talkscope.

Every error the engine raises on purpose derives from :class:`EngineError`. Third-party errors
(PyAV, onnxruntime, OS errors) are translated at the edge into one of these, with a message a
person can act on.

::

    EngineError                      retryable=False unless stated
    ├── UsageError                   bad arguments or configuration (CLI exit code 2)
    ├── InputError                   bad input media (CLI exit code 2)
    │   ├── MediaNotFound            the path does not exist or is not a file
    │   ├── CorruptMedia             the container or a stream cannot be decoded
    │   ├── MissingStream            the media lacks the audio or video the job needs
    │   ├── UnsupportedSource        a URL scheme or device format this build cannot open
    │   └── WeightsError             a model weights file is unreadable or does not fit the model
    │       └── NoWeights            no trained weights are installed for the model asked for
    ├── SourceUnavailable            a live source cannot be reached now (retryable=True)
    ├── ChannelClosed                send or recv on a closed channel
    ├── ConcurrencyError             two consumers called recv() on one channel at once
    ├── StageError                   a pipeline stage failed; the cause is chained
    └── Overloaded                   a bounded queue is full and the caller chose not to wait
                                     (retryable=True)
"""

from __future__ import annotations


class EngineError(Exception):
    """Root of every error talkscope raises on purpose.

    Attributes:
        retryable: True when the same call may succeed later without any change by the caller
            (a network source that is down now, say).
    """

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        """Create the error.

        Args:
            message: one line a person can act on.
            retryable: overrides the class default when given.
        """
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


class UsageError(EngineError):
    """The arguments or the configuration are wrong."""


class InputError(EngineError):
    """The input media is unusable for the job asked of it."""


class MediaNotFound(InputError):
    """The path does not exist or is not a regular file."""


class CorruptMedia(InputError):
    """The container, a packet or a stream cannot be decoded."""


class MissingStream(InputError):
    """The media has no audio stream or no video stream where the job needs one."""


class UnsupportedSource(InputError):
    """A URL scheme, protocol or capture format this build cannot open."""


class SourceUnavailable(EngineError):
    """A live source (device, network URL) cannot be reached right now."""

    retryable = True


class ChannelClosed(EngineError):
    """The channel was closed: nothing more can be sent, and nothing is left to receive."""


class ConcurrencyError(EngineError):
    """A second consumer called ``recv()`` while another one was waiting on the same channel."""


class StageError(EngineError):
    """A stage of a pipeline raised; the original exception is the ``__cause__``."""


class WeightsError(InputError):
    """A model weights file cannot be read, or its keys, shapes or hash do not fit the model."""


class Overloaded(EngineError):
    """A bounded queue is full and the caller asked to be refused rather than wait.

    Live code catches it to drop the item (a video frame, say) instead of adding latency; the
    same call may succeed once the queue has drained.
    """

    retryable = True


class NoWeights(WeightsError):
    """No trained weights are installed for the model asked for, and none were passed.

    The message says where they were looked for and how to get or pass them. Nothing ever falls
    back to random weights.
    """
