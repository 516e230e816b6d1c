"""virtio-net for vmrun: a separately installable device plugin."""
