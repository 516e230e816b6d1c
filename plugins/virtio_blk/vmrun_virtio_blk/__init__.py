"""virtio-blk for vmrun: a separately installable device plugin."""
