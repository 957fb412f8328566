"""Hostile bodies shared by the tests that prove proxyd reads them as the other side does."""

from __future__ import annotations

import base64


def utf7_shift(text: str) -> bytes:
    """``text`` as one UTF-7 shifted sequence: ``+`` base64(UTF-16BE) ``-`` (RFC 2152)."""
    return b"+" + base64.b64encode(text.encode("utf-16-be")).rstrip(b"=") + b"-"


# Read as UTF-8 it calls echo (its text is the base64 letters); read as UTF-7 the shifted
# sequences become `"},"name":"delete_everything","x":{"y":{"q":"` and `"},"w":"`, which move
# `"name":"echo"` into a nested object and put `"name":"delete_everything"` in params. Neither
# reading has a duplicate key, so a duplicate-key check alone does not stop it (issue 10 §1).
UTF7_DUAL_BODY = (
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"arguments":{"text":"'
    + utf7_shift('"},"name":"delete_everything","x":{"y":{"q":"')
    + b'"},"name":"echo","_meta":{"z":"'
    + utf7_shift('"},"w":"')
    + b'"}}}'
)
