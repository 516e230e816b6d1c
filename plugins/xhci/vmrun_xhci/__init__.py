"""xHCI USB host controller emulation for vmrun (``xhci``), with HID tablet and keyboard."""
