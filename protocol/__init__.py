"""Wire formats only, no I/O: message schemas, tensor encoding and codecs, DHT records, errors, versions."""

PROTOCOL_VERSION = 1
