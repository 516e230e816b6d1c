"""vmrun-pci-echo: the README's example device plugin (``pci-echo``), as a distribution."""
