"""``-o`` keys that make a cache image, checked one by one, then together."""

from __future__ import annotations

from collections.abc import Callable

from bootcache.errors import ImageFormatError
from bootcache.qcow2 import cache_ext
from bootcache.qcow2.cache_ext import CacheExtension

CACHE_KEYS = frozenset({"cache_img_quota", "cache_policy", "cache_high_watermark",
                        "cache_low_watermark", "cache_on_stale"})


def cache_extension_from_options(opts: dict[str, str],
                                 parse_size: Callable[[str], int]) -> CacheExtension | None:
    """The extension a new cache image starts with, or None without a quota."""
    if "cache_img_quota" not in opts:
        return None
    quota = parse_size(opts["cache_img_quota"])
    if quota <= 0:
        raise ImageFormatError("cache_img_quota must be positive")
    policies = {v: k for k, v in cache_ext.POLICY_NAMES.items()}
    stale = {v: k for k, v in cache_ext.ON_STALE_NAMES.items()}
    policy_name = opts.get("cache_policy", "stop")
    if policy_name not in policies:
        raise ImageFormatError(f"cache_policy must be stop or lru, not {policy_name!r}")
    stale_name = opts.get("cache_on_stale", "reset")
    if stale_name not in stale:
        raise ImageFormatError(f"cache_on_stale must be reset or refuse, not {stale_name!r}")
    ext = CacheExtension(quota=quota, policy=policies[policy_name],
                         on_stale=stale[stale_name])
    for key, attr in (("cache_high_watermark", "high_watermark"),
                      ("cache_low_watermark", "low_watermark")):
        if key in opts:
            try:
                setattr(ext, attr, int(opts[key].rstrip("%")))
            except ValueError as e:
                raise ImageFormatError(f"{key} must be a percentage") from e
    # Readers ignore the watermarks under stop, but a writer records valid ones,
    # so that switching the policy to lru needs no other edit.
    if not 0 < ext.low_watermark <= ext.high_watermark <= 100:
        raise ImageFormatError(
            f"watermarks {ext.low_watermark}/{ext.high_watermark} must satisfy "
            "0 < low <= high <= 100")
    ext.validate()
    return ext
