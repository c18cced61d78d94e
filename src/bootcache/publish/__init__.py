"""Published caches: a warm cache as one portable, self-verifying qcow2 file.

    artifact.py   what a published cache is: its header, and the checks a reader makes
    publish.py    cache image -> artifact (compressed on worker threads), to a path or S3
    fetch.py      an artifact from a path, HTTP(S) or S3, resumed after an interruption
    pull.py       artifact -> a normal cache image, verified, put in place atomically

Format: docs/spec/cache-image.md, section 13.
"""
