"""fbuf: a linear framebuffer (QEMU's bochs-display programming model) and a VNC server."""
