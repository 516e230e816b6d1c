/*
 * vfb: draws frames into a bochs-display framebuffer (QEMU's bochs-display, vmrun's fbuf)
 * from guest user mode, for the display benchmark (bench/fbuf.py --native).
 *
 * At CPL0 it finds PCI 1234:1111 on bus 0, places BAR 0 (the framebuffer) at 0xC0000000,
 * where entry.S maps 4 KiB pages (kvm-pvm mishandles accesses through 2 MiB ones: under QEMU
 * the guest hung on its first register access at 0xC1000000), and BAR 2 (the registers) at
 * 48 MiB, also in 4 KiB pages (the machine has 32 MiB of RAM), sets the mode through the
 * dispi registers, says "vfb: ready" on the debug console, then draws at CPL3 until the VM is ended:
 *
 *   work=full   every frame repaints the whole screen (bands of four colours, moving)
 *   work=line   every frame rewrites one 8x16-glyph text line (colour changing)
 *
 * Options (PVH command line): w=1024 h=768 work=full|line.
 */
#define GUEST_NAME "vfb"
#include "runtime.h"

#define FB_BASE 0xC0000000ull
#define MMIO_BASE 0x03000000ull    /* above 32 MiB of RAM, in entry.S's 4 KiB-page range */

static u32 width, height;
static int line_work;

static void user_main(void)
{
	static const u32 colours[4] = {0x203040, 0xC08020, 0x10A0F0, 0xFFFFFF};
	volatile u32 *fb = (volatile u32 *)FB_BASE;
	for (u32 i = 1;; i++) {
		if (!line_work) {
			for (u32 y = 0; y < height; y++) {
				u32 c = colours[(i + y / 48) % 4];
				volatile u32 *row = fb + (u64)y * width;
				for (u32 x = 0; x < width; x++)
					row[x] = c;
			}
		} else {
			u32 y0 = 16 * (i % 40), c = 0x010101u * (20 + i % 200);
			for (u32 r = 0; r < 16; r++) {
				volatile u32 *row = fb + (u64)(y0 + r) * width;
				for (u32 x = 0; x < 960; x++)
					row[x] = ((x / 8) % 2 && (r + i) % 2) ? c : 0;
			}
		}
	}
}

void kernel_main(void)
{
	cmdline_init();
	width = (u32)option("w", 1024);
	height = (u32)option("h", 768);
	line_work = option_is("work", "line");
	int slot = pci_find_id(0x11111234u);
	if (slot < 0)
		fail("no bochs-display (1234:1111) on bus 0", 0);
	pci_write32(slot, 0x04, 0);                       /* decoding off while moving BARs */
	pci_write32(slot, 0x10, (u32)FB_BASE | (pci_read(slot, 0x10) & 0xF));
	pci_write32(slot, 0x18, (u32)MMIO_BASE);
	pci_write32(slot, 0x04, 0x2);                     /* memory decoding on */
	u64 dispi = MMIO_BASE + 0x500;
	if ((rd16(dispi) & 0xFFF0) != 0xB0C0)
		fail("no dispi ID", rd16(dispi));
	wr16(dispi + 2 * 4, 0);
	wr16(dispi + 2 * 3, 32);
	wr16(dispi + 2 * 1, (u16)width);
	wr16(dispi + 2 * 2, (u16)height);
	wr16(dispi + 2 * 5, 0);
	wr16(dispi + 2 * 6, (u16)width);
	wr16(dispi + 2 * 7, (u16)height);
	wr16(dispi + 2 * 8, 0);
	wr16(dispi + 2 * 9, 0);
	wr16(dispi + 2 * 4, 0x41);                        /* enabled, linear framebuffer */
	wr32(MMIO_BASE + 0x604, 0x1E1E1E1E);              /* little endian */
	console_write("vfb: ready\n");
	run_user(user_main);
}
