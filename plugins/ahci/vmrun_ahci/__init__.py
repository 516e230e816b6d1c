"""AHCI (SATA) for vmrun: a separately installable device plugin."""
