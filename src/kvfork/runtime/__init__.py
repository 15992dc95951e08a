"""runtime package: the Engine and the handles it gives out (Snapshot, Branch), and its use of a SnapshotStore."""

from kvfork.runtime.branch import Branch
from kvfork.runtime.engine import Engine
from kvfork.runtime.snapshot import Snapshot

__all__ = ["Branch", "Engine", "Snapshot"]
