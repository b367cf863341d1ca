"""What users type to name an image: `NAME:TAG`, `NAME` (tag `latest`) or `sha256:<hex>`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from nova import errors
from nova.store import keys

DEFAULT_TAG = "latest"
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class ImageRef:
    """A parsed reference: either a tag (`name`, `tag`) or a digest."""

    name: str = ""
    tag: str = ""
    digest: str = ""

    @classmethod
    def parse(cls, text: str, *, what: str = "image") -> ImageRef:
        """UsageError naming `what` when `text` is neither NAME[:TAG] nor sha256:<64 hex>."""
        if text.startswith("sha256:"):
            if not _SHA256.fullmatch(text):
                raise errors.UsageError(
                    f"invalid {what} {text!r}: a digest is sha256: and 64 lowercase hex digits"
                )
            return cls(digest=text)
        name, sep, tag = text.partition(":")
        if sep and not tag:
            raise errors.UsageError(f"invalid {what} {text!r}: the tag after ':' is empty")
        try:
            keys.segment(name, what="image name")
            keys.segment(tag or DEFAULT_TAG, what="image tag")
        except ValueError as exc:
            raise errors.UsageError(f"invalid {what} {text!r}: {exc}") from None
        return cls(name=name, tag=tag or DEFAULT_TAG)

    @property
    def is_digest(self) -> bool:
        return bool(self.digest)

    def __str__(self) -> str:
        return self.digest or f"{self.name}:{self.tag}"
