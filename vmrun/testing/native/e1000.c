/*
 * e1000: a bare-metal Intel 8254x (82545EM) driver and benchmark that runs at CPL3.
 *
 * Entered from entry.S in 64-bit user mode with IOPL=3 and the low 4 GiB identity-mapped,
 * like vblk and vnet. It finds the first 8086:100F function on PCI bus 0, resets the MAC
 * (CTRL.RST), reads the MAC address from the EEPROM through EERD, sets up a legacy receive
 * ring (2 KiB buffers, CRC stripped) and a legacy transmit ring of 256 descriptors each with
 * interrupts masked (it polls the descriptors' DD bits), then, per the PVH command line:
 *
 *   tests=t   tx: send count= frames of size= bytes (Ethernet header included) to the
 *             broadcast address, ethertype 0x88B5, refilling the transmit ring whenever
 *             half of it is done (one TDT write per refill);
 *   tests=r   rx: receive count= frames (whatever the host sends), checking each length
 *             against size=, giving buffers back every rdt_every= frames (one RDT
 *             write; default 16, as Linux's e1000 does).
 *
 * Each test sits between "begin NAME" and "end NAME frames=N bytes=B" lines on the debug
 * console (port 0xE9), as vnet's do, so bench/e1000.py times it like bench/net.py; the VM
 * ends through the debug-exit port (0 success, 1 error). The same ELF runs under QEMU
 * (-device e1000), which makes it a like-for-like NIC benchmark.
 */
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

#define DEBUGCON 0xE9
#define DEBUG_EXIT 0xF4
#define MiB (1024 * 1024)

/* Guest-physical work area (identity-mapped): the rings, then the buffers. */
#define RXQ_BASE   0x01000000ull
#define TXQ_BASE   0x01010000ull
#define RXBUF_BASE 0x02000000ull
#define TXBUF_BASE 0x02100000ull
#define BUF_SIZE   2048

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void barrier(void) { __asm__ volatile("" : : : "memory"); }
static inline void cpu_relax(void) { __asm__ volatile("pause" : : : "memory"); }

static inline u8 rd8(u64 a) { return *(volatile u8 *)a; }
static inline u16 rd16(u64 a) { return *(volatile u16 *)a; }
static inline u32 rd32(u64 a) { return *(volatile u32 *)a; }
static inline void wr8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void wr16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void wr32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void wr64(u64 a, u64 v) { wr32(a, (u32)v); wr32(a + 4, (u32)(v >> 32)); }

/* The compiler may call these for struct copies even when freestanding. */
void *memset(void *d, int c, unsigned long n)
{
	for (unsigned long i = 0; i < n; i++)
		((volatile u8 *)d)[i] = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
	for (unsigned long i = 0; i < n; i++)
		((volatile u8 *)d)[i] = ((const u8 *)s)[i];
	return d;
}


/* -- output: lines on the debug console; from user mode through a ucall ------------ */
enum { UCALL_PRINT = 1, UCALL_EXIT = 2 };
static int in_user;
static char line[160];
static int line_len;

static void put(const char *s)
{
	while (*s && line_len < (int)sizeof(line) - 1)
		line[line_len++] = *s++;
}

static void putu(u64 v)
{
	char buf[24];
	int i = 23;
	buf[i] = 0;
	do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v);
	put(buf + i);
}

static void puthex(u64 v)
{
	char buf[19] = "0x";
	for (int i = 0; i < 16; i++)
		buf[2 + i] = "0123456789abcdef"[(v >> (60 - 4 * i)) & 0xF];
	buf[18] = 0;
	put(buf);
}

/* In entry.S: ud2 with op and arg in rdi/rsi, keeping the callee-saved registers in memory
 * across it — returning to user mode from emulated kernel code, kvm-pvm hands back zeroed
 * general-purpose registers (seen under QEMU too), so only memory and RSP survive. */
extern void ucall(u64 op, u64 arg);

static void console_write(const char *s)
{
	while (*s)
		outb(DEBUGCON, (u8)*s++);
}

/* Ends the line being built and writes it out. */
static void flush_line(void)
{
	put("\n");
	line[line_len] = 0;
	if (in_user)
		ucall(UCALL_PRINT, (u64)(uintptr_t)line);
	else
		console_write(line);
	line_len = 0;
}

static void __attribute__((noreturn)) finish(u8 code)
{
	if (in_user)
		ucall(UCALL_EXIT, code);
	outb(DEBUG_EXIT, code);
	for (;;)
		cpu_relax();
}

static void __attribute__((noreturn)) fail(const char *why, u64 value)
{
	put("e1000: error: ");
	put(why);
	put(" ");
	puthex(value);
	flush_line();
	finish(1);
}

/* Saved by ud_entry in entry.S (pushed rax first, so r15 is lowest). */
struct frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 rip, cs, rflags, rsp, ss;
};

void ucall_handler(struct frame *f)
{
	if (f->rdi == UCALL_PRINT)
		console_write((const char *)(uintptr_t)f->rsi);
	else if (f->rdi == UCALL_EXIT)
		outb(DEBUG_EXIT, (u8)f->rsi);
	else {
		console_write("e1000: unexpected #UD\n");
		outb(DEBUG_EXIT, 1);
	}
	f->rip += 2;
}

void __attribute__((noreturn)) fault_handler(u64 vector, u64 *stack)
{
	in_user = 0;
	put("e1000: exception ");
	putu(vector);
	put(" at ");
	puthex(stack[0]);
	put(" ");
	puthex(stack[1]);
	flush_line();
	finish(1);
}

/* -- PCI (mechanism #1) --------------------------------------------------------------- */
static u32 pci_read(int slot, int off)
{
	outl(0xCF8, 0x80000000u | (u32)slot << 11 | (u32)(off & 0xFC));
	return inl(0xCFC) >> ((off & 3) * 8);
}

static void pci_write32(int slot, int off, u32 v)
{
	outl(0xCF8, 0x80000000u | (u32)slot << 11 | (u32)(off & 0xFC));
	outl(0xCFC, v);
}

/* A BAR's address; one left unassigned (0) by firmware is placed as firmware would. */
static u64 bar_address(int slot, int bar)
{
	int off = 0x10 + 4 * bar;
	u32 lo = pci_read(slot, off);
	if (lo & 1)
		fail("register BAR is an I/O BAR", (u64)bar);
	int is64 = (lo & 6) == 4;
	u64 addr = lo & ~0xFull;
	if (is64)
		addr |= (u64)pci_read(slot, off + 4) << 32;
	if (addr == 0) {
		addr = 0xC0000000ull + ((u64)slot << 20) + ((u64)bar << 16);
		pci_write32(slot, off, (u32)addr | (lo & 0xF));
		if (is64)
			pci_write32(slot, off + 4, 0);
	}
	if (addr >= (4ull << 30))
		fail("BAR not below 4 GiB", addr);
	return addr;
}

/* -- the 8254x ------------------------------------------------------------------------ */
enum {
	CTRL = 0x0000, STATUS = 0x0008, EERD = 0x0014, ICR = 0x00C0, IMC = 0x00D8,
	RCTL = 0x0100, TCTL = 0x0400, TIPG = 0x0410,
	RDBAL = 0x2800, RDBAH = 0x2804, RDLEN = 0x2808, RDH = 0x2810, RDT = 0x2818,
	TDBAL = 0x3800, TDBAH = 0x3804, TDLEN = 0x3808, TDH = 0x3810, TDT = 0x3818,
	RAL0 = 0x5400, RAH0 = 0x5404,
};
#define CTRL_RST (1u << 26)
#define CTRL_SLU (1u << 6)
#define RCTL_EN (1u << 1)
#define RCTL_BAM (1u << 15)
#define RCTL_SECRC (1u << 26)
#define TCTL_EN (1u << 1)
#define TCTL_PSP (1u << 3)
#define TXD_EOP 0x01
#define TXD_IFCS 0x02
#define TXD_RS 0x08
#define DD 0x01
#define EOP 0x02
#define RING 256

/* Legacy descriptors (8254x SDM 3.2.3, 3.3.3). */
struct rxd { u64 addr; u16 len; u16 csum; u8 status; u8 errors; u16 special; };
struct txd { u64 addr; u16 len; u8 cso; u8 cmd; u8 status; u8 css; u16 special; };

static u64 regs;
static u8 mac[6];
static volatile struct rxd *rxr;
static volatile struct txd *txr;
static u32 rx_next, tx_next, tx_clean, tx_inflight;

static u32 reg(u32 off) { return rd32(regs + off); }
static void wreg(u32 off, u32 v) { wr32(regs + off, v); }

static u16 eeprom(u32 word)
{
	wreg(EERD, word << 8 | 1);
	for (int i = 0; i < 100000; i++) {
		u32 v = reg(EERD);
		if (v & 0x10)
			return (u16)(v >> 16);
		cpu_relax();
	}
	fail("EERD never done, word", word);
}

static void nic_setup(void)
{
	int slot = -1;
	for (int s = 0; s < 32 && slot < 0; s++)
		if (pci_read(s, 0) == (0x100Fu << 16 | 0x8086))
			slot = s;
	if (slot < 0)
		fail("no 8086:100F on bus 0", 0);
	regs = bar_address(slot, 0);
	pci_write32(slot, 0x04, (pci_read(slot, 0x04) & 0xFFFF) | 0x6);   /* memory, master */
	wreg(IMC, 0xFFFFFFFF);
	wreg(RCTL, 0);
	wreg(TCTL, TCTL_PSP);
	wreg(CTRL, reg(CTRL) | CTRL_RST);
	for (int i = 0; i < 1000000 && (reg(CTRL) & CTRL_RST); i++)
		cpu_relax();
	wreg(IMC, 0xFFFFFFFF);
	(void)reg(ICR);
	wreg(CTRL, reg(CTRL) | CTRL_SLU);
	u32 sum = 0;
	for (u32 w = 0; w < 64; w++) {
		u16 v = eeprom(w);
		sum += v;
		if (w < 3) {
			mac[2 * w] = (u8)v;
			mac[2 * w + 1] = (u8)(v >> 8);
		}
	}
	if ((sum & 0xFFFF) != 0xBABA)
		fail("EEPROM checksum", sum & 0xFFFF);
	wreg(RAL0, (u32)mac[0] | (u32)mac[1] << 8 | (u32)mac[2] << 16 | (u32)mac[3] << 24);
	wreg(RAH0, (u32)mac[4] | (u32)mac[5] << 8 | 1u << 31);

	txr = (volatile struct txd *)TXQ_BASE;
	rxr = (volatile struct rxd *)RXQ_BASE;
	for (u32 i = 0; i < RING; i++) {
		txr[i] = (struct txd){TXBUF_BASE + (u64)i * BUF_SIZE, 0, 0, 0, DD, 0, 0};
		rxr[i] = (struct rxd){RXBUF_BASE + (u64)i * BUF_SIZE, 0, 0, 0, 0, 0};
	}
	wreg(TDBAL, (u32)TXQ_BASE);
	wreg(TDBAH, 0);
	wreg(TDLEN, RING * 16);
	wreg(TDH, 0);
	wreg(TDT, 0);
	wreg(TIPG, 10 | 10 << 10 | 10 << 20);
	wreg(TCTL, TCTL_EN | TCTL_PSP | 0x0F << 4 | 0x40 << 12);
	wreg(RDBAL, (u32)RXQ_BASE);
	wreg(RDBAH, 0);
	wreg(RDLEN, RING * 16);
	wreg(RDH, 0);
	wreg(RDT, 0);
	wreg(RCTL, RCTL_EN | RCTL_BAM | RCTL_SECRC);      /* 2 KiB buffers */
	wreg(RDT, RING - 1);
}

/* -- the tests ------------------------------------------------------------------------ */
static void begin(const char *name)
{
	put("begin ");
	put(name);
	flush_line();
}

static void end(const char *name, u64 frames, u64 bytes)
{
	put("end ");
	put(name);
	put(" frames=");
	putu(frames);
	put(" bytes=");
	putu(bytes);
	flush_line();
}

static void tx_reap(void)
{
	while (tx_inflight && (txr[tx_clean].status & DD)) {
		tx_clean = (tx_clean + 1) % RING;
		tx_inflight--;
	}
}

static void tx_test(u64 count, u32 size)
{
	/* Every buffer holds the same frame: broadcast, our MAC, 0x88B5, a counting pattern. */
	for (u32 i = 0; i < RING; i++) {
		u64 b = TXBUF_BASE + (u64)i * BUF_SIZE;
		for (int k = 0; k < 6; k++) {
			wr8(b + k, 0xFF);
			wr8(b + 6 + k, mac[k]);
		}
		wr8(b + 12, 0x88);
		wr8(b + 13, 0xB5);
		for (u32 k = 14; k < size; k++)
			wr8(b + k, (u8)k);
	}
	begin("tx");
	u64 sent = 0;
	while (sent < count) {
		while (tx_inflight < RING - 1 && sent < count) {
			volatile struct txd *d = &txr[tx_next];
			d->len = (u16)size;
			d->status = 0;
			d->cmd = TXD_EOP | TXD_IFCS | TXD_RS;
			tx_next = (tx_next + 1) % RING;
			tx_inflight++;
			sent++;
		}
		barrier();
		wreg(TDT, tx_next);
		do {                 /* refill once half the ring is back: one TDT write per batch */
			cpu_relax();
			tx_reap();
		} while (tx_inflight > RING / 2);
	}
	while (tx_inflight) {
		cpu_relax();
		tx_reap();
	}
	end("tx", count, count * size);
}

static u64 rdt_every = 16;

static void rx_test(u64 count, u32 size)
{
	u64 got = 0, bad = 0, bytes = 0;
	int started = 0;
	u32 last = RING - 1;
	while (got < count) {
		volatile struct rxd *d = &rxr[rx_next];
		if (!(d->status & DD)) {
			cpu_relax();
			continue;
		}
		if (!started) {
			begin("rx");      /* timed from the first frame: the host may start late */
			started = 1;
		}
		got++;
		bytes += d->len;
		if (d->len != size || !(d->status & EOP))
			bad++;
		d->status = 0;
		last = rx_next;
		rx_next = (rx_next + 1) % RING;
		if (got % rdt_every == 0) {
			barrier();
			wreg(RDT, last);
		}
	}
	wreg(RDT, last);
	end("rx", got, bytes);
	if (bad)
		fail("frames of the wrong length", bad);
}

/* -- command line (PVH start_info) ----------------------------------------------------- */
extern u32 start_info_paddr;
static const char *cmdline;

static const char *find(const char *key)
{
	for (const char *p = cmdline; p && *p; p++) {
		const char *k = key, *q = p;
		while (*k && *q == *k) { k++; q++; }
		if (*k == 0 && *q == '=' && (p == cmdline || p[-1] == ' '))
			return q + 1;
	}
	return 0;
}

static u64 option(const char *key, u64 dflt)
{
	const char *q = find(key);
	if (!q)
		return dflt;
	u64 v = 0;
	for (; *q >= '0' && *q <= '9'; q++)
		v = v * 10 + (u64)(*q - '0');
	return v;
}

static int has_test(char t)
{
	const char *p = find("tests");
	for (; p && *p && *p != ' '; p++)
		if (*p == t)
			return 1;
	return 0;
}

static u64 count;
static u32 size;
extern void enter_user(void (*fn)(void), u64 stack_top);
static u8 user_stack[65536] __attribute__((aligned(16)));

static void user_main(void)
{
	in_user = 1;
	if (has_test('t'))
		tx_test(count, size);
	if (has_test('r'))
		rx_test(count, size);
	put("e1000: done");
	flush_line();
	finish(0);
}

void kernel_main(void)
{
	if (start_info_paddr && rd32(start_info_paddr) == 0x336ec578)
		cmdline = (const char *)(uintptr_t)*(volatile u64 *)(u64)(start_info_paddr + 24);
	count = option("count", 100000);
	size = (u32)option("size", 64);
	rdt_every = option("rdt_every", 16);
	if (rdt_every < 1 || rdt_every > RING / 2)
		fail("rdt_every must be 1..128", rdt_every);
	if (size < 60 || size > 1514)
		fail("size must be 60..1514", size);
	nic_setup();
	put("e1000: mac=");
	for (int i = 0; i < 6; i++)
		puthex(mac[i]);
	put(" ring=");
	putu(RING);
	flush_line();
	enter_user(user_main, (u64)(uintptr_t)(user_stack + sizeof(user_stack)));
}
