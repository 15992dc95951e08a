"""reuse: KV reuse of shared content that is not a prefix (issue 7): shift, kvcomm anchors, blend."""

from kvfork.reuse.anchors import AnchorPool, Estimate
from kvfork.reuse.composer import Composer, Part, Segment
from kvfork.reuse.config import REUSE_MODES, ReuseConfig, ReuseMode
from kvfork.reuse.report import ReuseReport, SegmentOutcome

__all__ = ["AnchorPool", "Estimate", "Composer", "Part", "Segment", "REUSE_MODES", "ReuseConfig", "ReuseMode",
           "ReuseReport", "SegmentOutcome"]
