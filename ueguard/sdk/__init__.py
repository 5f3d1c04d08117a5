"""The Python SDK: ``protect`` and ``verify`` with the command line's options as keyword arguments.

    from ueguard.sdk import protect, verify
    result = protect("photos/", eps="8/255", budget="quick")           # folder → mirrored folder
    result = protect(images_uint8_nhwc, labels=labels, budget="quick")  # array → result.data
    report = verify("photos_protected/", test="test/", clean="photos/")
"""

from ueguard.sdk.options import ProtectOptions
from ueguard.sdk.protect import ProtectResult, protect
from ueguard.sdk.verify import VerifyOptions, verify

__all__ = ["ProtectOptions", "ProtectResult", "VerifyOptions", "protect", "verify"]
