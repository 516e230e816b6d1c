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
#define GUEST_NAME "e1000"
#include "runtime.h"

/* Guest-physical work area (identity-mapped): the rings, then the buffers. */
#define RXQ_BASE   0x01000000ull
#define TXQ_BASE   0x01010000ull
#define RXBUF_BASE 0x02000000ull
#define TXBUF_BASE 0x02100000ull
#define BUF_SIZE   2048

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
	int slot = pci_find_id(0x100Fu << 16 | 0x8086);
	if (slot < 0)
		fail("no 8086:100F on bus 0", 0);
	regs = bar_address(slot, 0);
	pci_enable(slot);                                  /* memory, master */
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
	begin_test("tx");
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
	end_test("tx", "frames", count, count * size);
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
			begin_test("rx");      /* timed from the first frame: the host may start late */
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
	end_test("rx", "frames", got, bytes);
	if (bad)
		fail("frames of the wrong length", bad);
}

static u64 count;
static u32 size;

static void user_main(void)
{
	in_user = 1;
	if (has_test('t', 0))
		tx_test(count, size);
	if (has_test('r', 0))
		rx_test(count, size);
	put("e1000: done");
	flush_line();
	finish(0);
}

void kernel_main(void)
{
	cmdline_init();
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
	run_user(user_main);
}
