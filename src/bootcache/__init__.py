"""bootcache: qcow2 cache images between a remote base and VM overlays."""

__version__ = "0.1.0"
