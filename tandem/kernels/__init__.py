"""Compute kernels behind one small API. The reference paths are plain torch; fast paths may replace them.

attend(): every attention read goes through here (via the KV cache), so cache formats and kernels meet in one place.
"""

from tandem.kernels.reference import attend_reference

attend = attend_reference

__all__ = ["attend", "attend_reference"]
