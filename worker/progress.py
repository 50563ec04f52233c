"""The worker's one progress callback type: bytes done, bytes in all."""

from collections.abc import Callable

ByteProgress = Callable[[int, int], None]
"""Called with (bytes done, bytes total) as a load, restore or snapshot moves bytes."""
