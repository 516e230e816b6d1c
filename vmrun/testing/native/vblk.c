/*
 * vblk: a bare-metal virtio-blk driver and benchmark that runs entirely at CPL3.
 *
 * Entered from entry.S in 64-bit user mode with IOPL=3 and the low 4 GiB identity-mapped.
 * It finds the first modern virtio-blk function on PCI bus 0 (mechanism #1 ports), sets it
 * up through the virtio 1.x PCI capabilities (one split queue, no interrupts: it polls the
 * used ring), then runs, each between "begin NAME" and "end NAME ..." lines on the debug
 * console (port 0xE9), so the host can time it:
 *
 *   read       sequential 1 MiB reads, one in flight   (seq_mib MiB)
 *   write      sequential 1 MiB writes, one in flight  (seq_mib MiB)
 *   randread   random 4 KiB reads, qd in flight         (rand_ios requests)
 *   randwrite  random 4 KiB writes, qd in flight        (rand_ios requests)
 *
 * and ends the VM through the debug-exit port (0xF4): 0 on success, 1 on an error.
 * Options come from the PVH command line: seq_mib=N rand_ios=N qd=N tests=rwRW (a subset).
 *
 * Every sector written carries its own number in its first 8 bytes, so the host can check
 * that data went where the guest said. The same binary runs under QEMU, which makes it a
 * like-for-like device benchmark on hosts where guest kernel code is slow to run.
 */
#define GUEST_NAME "vblk"
#include "runtime.h"
#include "virtio.h"

/* Guest-physical work area (identity-mapped): queue, headers, status bytes, data buffers. */
#define QUEUE_BASE 0x01000000ull
#define HDR_BASE   0x01100000ull
#define DATA_BASE  0x02000000ull     /* 1 MiB for sequential, qd x 4 KiB for random */
#define MAX_QD     64

/* -- virtio-blk ------------------------------------------------------------------------ */
enum { T_IN = 0, T_OUT = 1 };

struct req_hdr { u32 type; u32 reserved; u64 sector; };

static struct vq q;               /* the one request queue */

static void blk_setup(void)
{
	int slot = -1;
	for (int s = 0; s < 32 && slot < 0; s++) {
		u32 id = pci_read(s, 0);
		if ((id & 0xFFFF) == 0x1AF4 && ((id >> 16) == 0x1042 || (id >> 16) == 0x1001))
			slot = s;
	}
	if (slot < 0)
		fail("no virtio-blk on bus 0", 0);
	pci_enable(slot);
	virtio_setup(slot, 0);
	virtq_setup(&q, 0, QUEUE_BASE);
	virtio_driver_ok();
}

/* -- requests --------------------------------------------------------------------------- */
static u64 capacity;             /* in 512-byte sectors */

/* Slot i owns descriptors 3i..3i+2, header i, status byte i. */
static void submit(int i, int type, u64 sector, u64 buf, u32 len)
{
	volatile struct req_hdr *h = (volatile struct req_hdr *)(HDR_BASE + 16ull * i);
	volatile u8 *status = (volatile u8 *)(HDR_BASE + 0x8000 + i);
	h->type = (u32)type;
	h->reserved = 0;
	h->sector = sector;
	*status = 0xFF;
	int d = 3 * i;
	q.descs[d] = (struct desc){(u64)(uintptr_t)h, 16, F_NEXT, (u16)(d + 1)};
	q.descs[d + 1] = (struct desc){buf, len, (u16)(F_NEXT | (type == T_IN ? F_WRITE : 0)),
				     (u16)(d + 2)};
	q.descs[d + 2] = (struct desc){(u64)(uintptr_t)status, 1, F_WRITE, 0};
	q.avail[2 + q.avail_idx % q.size] = (u16)d;
	q.avail_idx++;
}

/* Wait for at least one completion; returns how many, their slots in done[].
 * The used index may only move forward, by at most what we have in flight: anything else is
 * a device that published it non-atomically (vmrun once did) and is reported as such. */
static int reap(int *done)
{
	u16 idx;
	while ((idx = q.used[1]) == q.used_seen)
		cpu_relax();
	barrier();
	if ((u16)(idx - q.used_seen) > MAX_QD) {
		put("vblk: used ring: read idx ");
		putu(idx);
		put(" then ");
		putu(q.used[1]);
		put(", seen ");
		putu(q.used_seen);
		put(", ring at ");
		puthex((u64)(uintptr_t)q.used);
		flush_line();
		fail("used index moved backwards or too far", idx);
	}
	int n = 0;
	volatile u32 *elems = (volatile u32 *)(q.used + 2);
	while (q.used_seen != idx) {
		u32 id = elems[2 * (q.used_seen % q.size)];
		if (id % 3 || id / 3 >= MAX_QD)
			fail("used ring names a descriptor we did not post", id);
		int i = (int)(id / 3);
		u8 st = *(volatile u8 *)(HDR_BASE + 0x8000 + i);
		if (st != 0)
			fail("request failed with status", st);
		done[n++] = i;
		q.used_seen++;
	}
	return n;
}

static void sequential(int type, u64 mib)
{
	const char *name = type == T_IN ? "read" : "write";
	int done[MAX_QD];
	u64 first = 0;
	if (mib * 2048 > capacity)
		fail("disk too small for seq_mib", capacity);
	begin_test(name);
	for (u64 m = 0; m < mib; m++) {
		if (type == T_OUT)
			fill_sectors(DATA_BASE, m * 2048, MiB);
		submit(0, type, m * 2048, DATA_BASE, MiB);
		virtq_kick(&q);
		reap(done);
		if (type == T_IN && m == 0)
			first = *(volatile u64 *)DATA_BASE;
	}
	end_test(name, "ios", mib, mib * MiB);
	if (type == T_IN) {
		put("vblk: sector 0 starts with ");
		putu(first);
		flush_line();
	}
}

static void random_io(int type, u64 ios, int qd)
{
	const char *name = type == T_IN ? "randread" : "randwrite";
	u64 blocks = capacity / 8, issued = 0, completed = 0;
	int done[MAX_QD];
	begin_test(name);
	for (int i = 0; i < qd && issued < ios; i++, issued++) {
		u64 sector = next_random() % blocks * 8;
		if (type == T_OUT)
			fill_sectors(DATA_BASE + 4096ull * i, sector, 4096);
		submit(i, type, sector, DATA_BASE + 4096ull * i, 4096);
	}
	virtq_kick(&q);
	while (completed < issued) {
		int n = reap(done);
		completed += (u64)n;
		for (int k = 0; k < n && issued < ios; k++, issued++) {
			u64 sector = next_random() % blocks * 8;
			int i = done[k];
			if (type == T_OUT)
				fill_sectors(DATA_BASE + 4096ull * i, sector, 4096);
			submit(i, type, sector, DATA_BASE + 4096ull * i, 4096);
		}
		virtq_kick(&q);
	}
	end_test(name, "ios", completed, completed * 4096);
}

static u64 seq_mib, rand_ios;
static int qd;

static void user_main(void)
{
	in_user = 1;
	if (has_test('r', 1))
		sequential(T_IN, seq_mib);
	if (has_test('w', 1))
		sequential(T_OUT, seq_mib);
	if (has_test('R', 1))
		random_io(T_IN, rand_ios, qd);
	if (has_test('W', 1))
		random_io(T_OUT, rand_ios, qd);
	put("vblk: done");
	flush_line();
	finish(0);
}

/* CPL0: read the options, set the device up (port I/O), then run the tests at CPL3. */
void kernel_main(void)
{
	cmdline_init();
	seq_mib = option("seq_mib", 64);
	rand_ios = option("rand_ios", 20000);
	qd = (int)option("qd", 32);
	if (qd < 1 || qd > MAX_QD)
		fail("qd must be 1..64", (u64)qd);
	blk_setup();
	capacity = (u64)rd32(devcfg) | (u64)rd32(devcfg + 4) << 32;
	if ((u64)qd * 3 > q.size)
		fail("queue too small for qd", q.size);
	put("vblk: capacity=");
	putu(capacity);
	put(" qsize=");
	putu(q.size);
	flush_line();
	run_user(user_main);
}
