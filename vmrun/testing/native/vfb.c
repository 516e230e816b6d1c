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
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

#define DEBUGCON 0xE9
#define DEBUG_EXIT 0xF4
#define FB_BASE 0xC0000000ull
#define MMIO_BASE 0x03000000ull    /* above 32 MiB of RAM, in entry.S's 4 KiB-page range */

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void wr16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void wr32(u64 a, u32 v) { *(volatile u32 *)a = v; }

void *memcpy(void *d, const void *s, unsigned long n)
{
	for (unsigned long i = 0; i < n; i++)
		((volatile u8 *)d)[i] = ((const u8 *)s)[i];
	return d;
}

void *memset(void *d, int c, unsigned long n)
{
	for (unsigned long i = 0; i < n; i++)
		((volatile u8 *)d)[i] = (u8)c;
	return d;
}

static void console_write(const char *s)
{
	while (*s)
		outb(DEBUGCON, (u8)*s++);
}

static void __attribute__((noreturn)) fail(const char *why)
{
	console_write("vfb: error: ");
	console_write(why);
	console_write("\n");
	outb(DEBUG_EXIT, 1);
	for (;;)
		__asm__ volatile("pause");
}

struct frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 rip, cs, rflags, rsp, ss;
};

void ucall_handler(struct frame *f)
{
	console_write("vfb: unexpected #UD\n");
	outb(DEBUG_EXIT, 1);
	f->rip += 2;
}

void __attribute__((noreturn)) fault_handler(u64 vector, u64 *stack)
{
	(void)vector;
	(void)stack;
	fail("exception");
}

static u32 pci_read(int slot, int off)
{
	outl(0xCF8, 0x80000000u | (u32)slot << 11 | (u32)(off & 0xFC));
	return inl(0xCFC);
}

static void pci_write32(int slot, int off, u32 v)
{
	outl(0xCF8, 0x80000000u | (u32)slot << 11 | (u32)(off & 0xFC));
	outl(0xCFC, v);
}

extern u32 start_info_paddr;
static const char *cmdline;

static u64 option(const char *key, u64 dflt)
{
	for (const char *p = cmdline; p && *p; p++) {
		const char *k = key, *q = p;
		while (*k && *q == *k) { k++; q++; }
		if (*k == 0 && *q == '=' && (p == cmdline || p[-1] == ' ')) {
			u64 v = 0;
			for (q++; *q >= '0' && *q <= '9'; q++)
				v = v * 10 + (u64)(*q - '0');
			return v;
		}
	}
	return dflt;
}

static int option_is(const char *key, const char *value)
{
	for (const char *p = cmdline; p && *p; p++) {
		const char *k = key, *q = p;
		while (*k && *q == *k) { k++; q++; }
		if (*k == 0 && *q == '=' && (p == cmdline || p[-1] == ' ')) {
			const char *v = value;
			for (q++; *v && *q == *v; q++, v++)
				;
			return *v == 0 && (*q == 0 || *q == ' ');
		}
	}
	return 0;
}

static u32 width, height;
static int line_work;
extern void enter_user(void (*fn)(void), u64 stack_top);
static u8 user_stack[65536] __attribute__((aligned(16)));

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
	if (start_info_paddr && *(volatile u32 *)(u64)start_info_paddr == 0x336ec578)
		cmdline = (const char *)(uintptr_t)*(volatile u64 *)(u64)(start_info_paddr + 24);
	width = (u32)option("w", 1024);
	height = (u32)option("h", 768);
	line_work = option_is("work", "line");
	int slot = -1;
	for (int s = 0; s < 32; s++)
		if (pci_read(s, 0) == 0x11111234u) {
			slot = s;
			break;
		}
	if (slot < 0)
		fail("no bochs-display (1234:1111) on bus 0");
	pci_write32(slot, 0x04, 0);                       /* decoding off while moving BARs */
	pci_write32(slot, 0x10, (u32)FB_BASE | (pci_read(slot, 0x10) & 0xF));
	pci_write32(slot, 0x18, (u32)MMIO_BASE);
	pci_write32(slot, 0x04, 0x2);                     /* memory decoding on */
	u64 dispi = MMIO_BASE + 0x500;
	if ((*(volatile u16 *)dispi & 0xFFF0) != 0xB0C0)
		fail("no dispi ID");
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
	enter_user(user_main, (u64)(uintptr_t)(user_stack + sizeof(user_stack)));
}
