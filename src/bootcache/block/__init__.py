"""The block-device interface every layer implements, and the graph that shares open layers.

The ground floor: image formats (qcow2/), layers/ and the NBD server build on it.
"""
