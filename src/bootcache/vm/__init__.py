"""Hot-plugging disks backed by a bootcache cache export into running VMs.

``monitor`` speaks QMP (through the ``qemu.qmp`` library), ``export``
checks the NBD export and makes the VM's local overlay, ``hotplug`` adds
and removes the nodes and the device with rollback. ``bootcache vm``
(``bootcache.cli.vm``) is the command line over them.
"""
