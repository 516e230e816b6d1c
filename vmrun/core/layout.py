"""The guest-physical and I/O-port map of a vmrun machine (bhyve's layout where it has one).

Everything that must agree between the device models, the ACPI tables and the boot code lives
here, so the DSDT can never describe a port the device is not at.
"""

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# --- guest-physical memory ---------------------------------------------------
LOW_RAM_END = 3 * GiB            # RAM below the PCI hole; the rest goes above 4 GiB
HIGH_RAM_START = 4 * GiB
PCI_MMIO32_START = 0xC000_0000   # 32-bit PCI BARs: 3 GiB .. ECAM
ECAM_BASE = 0xE000_0000          # PCI Express enhanced configuration space (bus 0..255)
ECAM_SIZE = 256 * MiB
IOAPIC_BASE = 0xFEC0_0000
HPET_BASE = 0xFED0_0000
LAPIC_BASE = 0xFEE0_0000
EBDA_START = 0x9FC00             # top of conventional memory (e820 reserves 640K..1M)
BIOS_START = 0xE0000             # ACPI RSDP lives in 0xE0000..0xFFFFF (scanned by the kernel)
ACPI_BASE = 0xE0000              # RSDP first, then the other tables
SMBIOS_BASE = 0xF0000            # SMBIOS entry point + structure table
HIGH_MMIO_SIZE = 64 * GiB        # 64-bit PCI BARs go right above high RAM

# --- boot structures (below 1 MiB) ----------------------------------------------
BOOT_GDT = 0x500
BOOT_IDT = 0x520
PVH_START_INFO = 0x6000
PVH_MODLIST = 0x6040
PVH_MEMMAP = 0x6100              # up to 64 entries of 24 bytes
ZERO_PAGE = 0x7000               # Linux boot_params ("zero page")
BOOT_STACK = 0x8000
PML4_START = 0x9000              # identity page tables for 64-bit bzImage entry
CMDLINE_START = 0x20000
CMDLINE_MAX = 0x10000
KERNEL_START = 0x100000          # 1 MiB

# --- I/O ports ---------------------------------------------------------------
COM1_PORT, COM1_IRQ = 0x3F8, 4
COM2_PORT, COM2_IRQ = 0x2F8, 3
COM3_PORT, COM3_IRQ = 0x3E8, 4
COM4_PORT, COM4_IRQ = 0x2E8, 3
I8042_DATA_PORT = 0x60
I8042_CMD_PORT = 0x64
I8042_KBD_IRQ = 1
I8042_AUX_IRQ = 12
RTC_PORT = 0x70                  # index 0x70, data 0x71
RTC_IRQ = 8
PM1A_EVT_PORT = 0x600            # PM1 status (2 bytes) + enable (2 bytes)
PM1A_EVT_LEN = 4
PM1A_CNT_PORT = 0x604            # PM1 control (2 bytes)
PM1A_CNT_LEN = 2
PM_TMR_PORT = 0x608              # ACPI PM timer, 32 bits at 3.579545 MHz
PM_TMR_LEN = 4
PM_TMR_HZ = 3_579_545
SCI_IRQ = 9
RESET_PORT = 0xCF9               # write 0x06 (or 0x0E) resets the machine
RESET_VALUE = 0x06
SLP_TYP_S5 = 5                   # the DSDT's \_S5 package and the PM1 control model agree on it
PCI_CONFIG_ADDRESS = 0xCF8       # PCI configuration mechanism #1: 0xCF8 address, 0xCFC data
DEBUG_EXIT_PORT = 0xF4           # test hook: a write of V ends vmrun with exit code V
BOOT_MARKER_PORT = 0xF5          # boot markers: a byte written = a timestamped milestone
DEBUGCON_PORT = 0xE9             # bochs/QEMU debug console: bytes go to the debug log

IOAPIC_PINS = 24
