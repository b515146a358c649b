"""blobmount: mount blob archives (FlatBuffers index + data blob) read-only through FUSE."""

__version__ = "0.1.0"
