"""Sans-I/O wire protocol: frame types, codecs, framing, error and close codes.

Nothing in this package performs I/O or imports asyncio.
"""

PROTOCOL_VERSION = 1
