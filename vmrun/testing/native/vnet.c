/*
 * vnet: a bare-metal virtio-net driver, benchmark and ping responder that runs at CPL3.
 *
 * Entered from entry.S in 64-bit user mode with IOPL=3 and the low 4 GiB identity-mapped,
 * like vblk. It finds the first modern virtio-net function on PCI bus 0, negotiates only
 * VERSION_1 and MAC (12-byte headers, no offloads, no merged buffers), sets up the receive
 * and transmit queues with interrupts off (it polls the used rings), then, per the PVH
 * command line:
 *
 *   tests=t   tx: send count= frames of size= bytes (Ethernet header included) to the
 *             broadcast address, ethertype 0x88B5, keeping the transmit queue full;
 *   tests=r   rx: receive count= frames (whatever the host sends), checking each length
 *             against size=;
 *   echo=1    answer ARP requests and ICMP echo requests for ip=A.B.C.D, forever (a peer
 *             for a Linux guest's ping over a socket link).
 *
 * Each test sits between "begin NAME" and "end NAME frames=N bytes=B" lines on the debug
 * console (port 0xE9); the VM ends through the debug-exit port (0 success, 1 error). The
 * same ELF runs under QEMU (-kernel), which makes it a like-for-like NIC benchmark.
 */
#define GUEST_NAME "vnet"
#include "runtime.h"
#include "virtio.h"

/* Guest-physical work area (identity-mapped): queue, headers, status bytes, data buffers. */
#define RXQ_BASE   0x01000000ull
#define TXQ_BASE   0x01010000ull
#define RXBUF_BASE 0x02000000ull
#define TXBUF_BASE 0x02100000ull
#define BUF_SIZE   2048

/* -- virtio-net ------------------------------------------------------------------------ */
#define VNET_F_MAC (1u << 5)
#define HDR 12

static struct vq rxq, txq;
static u8 mac[6];

static void net_setup(void)
{
	int slot = pci_find_id(0x1041u << 16 | 0x1AF4);
	if (slot < 0)
		fail("no modern virtio-net on bus 0", 0);
	pci_enable(slot);
	u32 want = virtio_setup(slot, VNET_F_MAC);
	virtq_setup(&rxq, 0, RXQ_BASE);
	virtq_setup(&txq, 1, TXQ_BASE);
	for (int i = 0; i < 6; i++)
		mac[i] = want ? rd8(devcfg + i) : (u8)(i == 0 ? 2 : i);
	virtio_driver_ok();
}

/* Post receive buffer i (descriptor i). */
static void rx_post(u16 i)
{
	rxq.descs[i] = (struct desc){RXBUF_BASE + (u64)i * BUF_SIZE, BUF_SIZE, F_WRITE, 0};
	rxq.avail[2 + rxq.avail_idx % rxq.size] = i;
	rxq.avail_idx++;
}

/* The next received frame: its descriptor and length (header included); -1: none yet. */
static int rx_poll(u32 *len)
{
	u16 idx = rxq.used[1];
	if (idx == rxq.used_seen)
		return -1;
	barrier();
	if ((u16)(idx - rxq.used_seen) > rxq.size)
		fail("receive used index ran ahead", idx);
	volatile u32 *elems = (volatile u32 *)(rxq.used + 2);
	u32 id = elems[2 * (rxq.used_seen % rxq.size)];
	*len = elems[2 * (rxq.used_seen % rxq.size) + 1];
	rxq.used_seen++;
	if (id >= rxq.size)
		fail("receive used ring names a descriptor we did not post", id);
	return (int)id;
}

/* Transmit: descriptor i owns buffer i; the header and frame are one buffer. */
static u16 tx_inflight;

static void tx_reap(void)
{
	u16 idx = txq.used[1];
	barrier();
	u16 n = (u16)(idx - txq.used_seen);
	if (n > tx_inflight)
		fail("transmit used index ran ahead", idx);
	txq.used_seen = idx;
	tx_inflight -= n;
}

static void tx_queue(u64 buf, u32 len)
{
	u16 i = txq.avail_idx % txq.size;
	txq.descs[i] = (struct desc){buf, len, 0, 0};
	txq.avail[2 + i] = i;
	txq.avail_idx++;
	tx_inflight++;
}

static void copy(u64 dst, u64 src, u32 n)
{
	for (u32 i = 0; i < n; i++)
		wr8(dst + i, rd8(src + i));
}

static void tx_test(u64 count, u32 size)
{
	/* Every transmit buffer holds the same frame: header (zeros), broadcast, our MAC. */
	for (u16 i = 0; i < txq.size; i++) {
		u64 b = TXBUF_BASE + (u64)i * BUF_SIZE;
		for (u32 k = 0; k < HDR + size; k++)
			wr8(b + k, 0);
		for (int k = 0; k < 6; k++) {
			wr8(b + HDR + k, 0xFF);
			wr8(b + HDR + 6 + k, mac[k]);
		}
		wr8(b + HDR + 12, 0x88);
		wr8(b + HDR + 13, 0xB5);
		for (u32 k = 14; k < size; k++)
			wr8(b + HDR + k, (u8)k);
	}
	begin_test("tx");
	u64 sent = 0;
	while (sent < count) {
		while (tx_inflight < txq.size && sent < count) {
			tx_queue(TXBUF_BASE + (u64)(txq.avail_idx % txq.size) * BUF_SIZE, HDR + size);
			sent++;
		}
		virtq_kick(&txq);
		do {
			cpu_relax();
			tx_reap();
		} while (tx_inflight == txq.size);
	}
	while (tx_inflight) {
		cpu_relax();
		tx_reap();
	}
	end_test("tx", "frames", count, count * size);
}

static void rx_test(u64 count, u32 size)
{
	u64 got = 0, bad = 0, bytes = 0;
	int started = 0;
	u32 len;
	while (got < count) {
		int id = rx_poll(&len);
		if (id < 0) {
			cpu_relax();
			continue;
		}
		if (!started) {
			begin_test("rx");      /* timed from the first frame: the host may start late */
			started = 1;
		}
		got++;
		bytes += len - HDR;
		if (len != HDR + size)
			bad++;
		rx_post((u16)id);
		if ((got & 15) == 0)
			virtq_kick(&rxq);
	}
	virtq_kick(&rxq);
	end_test("rx", "frames", got, bytes);
	if (bad)
		fail("frames of the wrong length", bad);
}

static u16 csum_add(u16 sum, u16 v)
{
	u32 s = (u32)sum + v;
	return (u16)((s & 0xFFFF) + (s >> 16));
}

static u32 my_ip;

static void echo(void)
{
	u32 len;
	u64 out = TXBUF_BASE;
	put("vnet: echo ready");
	flush_line();
	for (;;) {
		int id = rx_poll(&len);
		if (id < 0) {
			cpu_relax();
			tx_reap();
			continue;
		}
		u64 f = RXBUF_BASE + (u64)id * BUF_SIZE + HDR;
		u32 n = len - HDR;
		u16 type = (u16)(rd8(f + 12) << 8 | rd8(f + 13));
		u64 o = out + HDR;
		int reply = 0;
		if (type == 0x0806 && n >= 42 && rd8(f + 21) == 1) {         /* ARP request */
			u32 tip = (u32)rd8(f + 38) << 24 | (u32)rd8(f + 39) << 16 | (u32)rd8(f + 40) << 8 | rd8(f + 41);
			if (tip == my_ip) {
				copy(o, f, 42);
				copy(o, f + 6, 6);                 /* to the asker */
				copy(o + 32, f + 22, 10);          /* target = sender (mac, ip) */
				for (int k = 0; k < 6; k++) {
					wr8(o + 6 + k, mac[k]);
					wr8(o + 22 + k, mac[k]);
				}
				wr8(o + 28, (u8)(my_ip >> 24)); wr8(o + 29, (u8)(my_ip >> 16));
				wr8(o + 30, (u8)(my_ip >> 8)); wr8(o + 31, (u8)my_ip);
				wr8(o + 21, 2);
				n = 42;
				reply = 1;
			}
		} else if (type == 0x0800 && n >= 34 + 8 && n <= 1514 && rd8(f + 23) == 1 &&
			   rd8(f + 34) == 8) {                /* ICMP echo request */
			u32 dip = (u32)rd8(f + 30) << 24 | (u32)rd8(f + 31) << 16 | (u32)rd8(f + 32) << 8 | rd8(f + 33);
			if (dip == my_ip) {
				copy(o, f, n);
				copy(o, f + 6, 6);
				for (int k = 0; k < 6; k++)
					wr8(o + 6 + k, mac[k]);
				copy(o + 26, f + 30, 4);           /* swap the addresses */
				copy(o + 30, f + 26, 4);
				wr8(o + 34, 0);                    /* echo reply: checksum + 0x0800 */
				u16 c = (u16)(rd8(o + 36) << 8 | rd8(o + 37));
				c = (u16)~csum_add((u16)~c, (u16)~0x0800 & 0xFFFF);
				wr8(o + 36, (u8)(c >> 8));
				wr8(o + 37, (u8)c);
				reply = 1;
			}
		}
		rx_post((u16)id);
		virtq_kick(&rxq);
		if (reply) {
			while (tx_inflight == txq.size) {
				cpu_relax();
				tx_reap();
			}
			for (int k = 0; k < HDR; k++)
				wr8(out + k, 0);
			tx_queue(out, HDR + n);
			virtq_kick(&txq);
			out = TXBUF_BASE + (u64)(txq.avail_idx % txq.size) * BUF_SIZE;
		}
	}
}

static u64 count;
static u32 size;

static void user_main(void)
{
	in_user = 1;
	for (u16 i = 0; i < rxq.size; i++)
		rx_post(i);
	virtq_kick(&rxq);
	if (my_ip)
		echo();
	if (has_test('t', 0))
		tx_test(count, size);
	if (has_test('r', 0))
		rx_test(count, size);
	put("vnet: done");
	flush_line();
	finish(0);
}

void kernel_main(void)
{
	cmdline_init();
	count = option("count", 100000);
	size = (u32)option("size", 64);
	if (size < 60 || size > 1514)
		fail("size must be 60..1514", size);
	my_ip = option("echo", 0) ? ip_option("ip") : 0;
	net_setup();
	put("vnet: mac=");
	for (int i = 0; i < 6; i++)
		puthex(mac[i]);
	put(" qsize=");
	putu(rxq.size);
	flush_line();
	run_user(user_main);
}
