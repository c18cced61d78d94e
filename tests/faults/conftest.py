"""The fault tests run a real daemon, as the node-service tests do."""

from daemon.conftest import daemons, sockdir  # noqa: F401  (fixtures)
