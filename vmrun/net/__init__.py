"""Host network backends shared by the NICs (virtio-net, e1000): see :mod:`vmrun.net.backend`."""
