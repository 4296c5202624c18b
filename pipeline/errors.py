"""Outcomes other than a score, each carrying a reason a person can read.

* :class:`RejectedImage` - the file is readable but out of scope (not a frontal
  chest radiograph, no pixels, colour photo, too small...). Final state ``rejected``.
* :class:`FailedImage` - the file cannot be read (empty, truncated, corrupt,
  undecodable, bomb). Final state ``failed``.
* :class:`IncompleteFile` - the file looks like it is still being written; the
  caller should retry later rather than fail it.

Reasons never contain patient identifiers: they describe structure, not content.
"""


class ImageProblem(Exception):
    """Base class: an image that does not yield a score."""

    status: str = "failed"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RejectedImage(ImageProblem):
    status = "rejected"


class FailedImage(ImageProblem):
    status = "failed"


class IncompleteFile(FailedImage):
    """Truncated in a way that a file still being copied would be."""
