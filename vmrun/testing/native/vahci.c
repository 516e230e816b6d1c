/*
 * vahci: a bare-metal AHCI driver and benchmark that runs at CPL3, vblk's twin for SATA.
 *
 * Entered from entry.S like vblk. It finds the first AHCI controller (class 01.06.01) on PCI
 * bus 0, resets the HBA, sets port 0 up (command list, FIS receive area; no interrupts: it
 * polls) and IDENTIFYs the disk, then runs, each between "begin NAME" and "end NAME ..."
 * lines on the debug console (port 0xE9):
 *
 *   read       sequential 1 MiB READ FPDMA QUEUED, one in flight   (seq_mib MiB)
 *   write      sequential 1 MiB WRITE FPDMA QUEUED, one in flight  (seq_mib MiB)
 *   randread   random 4 KiB NCQ reads, qd tags in flight            (rand_ios requests)
 *   randwrite  random 4 KiB NCQ writes, qd tags in flight           (rand_ios requests)
 *
 * and ends the VM through the debug-exit port (0xF4): 0 on success, 1 on an error. Options
 * as vblk's: seq_mib=N rand_ios=N qd=N (1..32) tests=rwRW. A batch of tags costs two
 * register writes (PxSACT, PxCI); completions are seen as a Set Device Bits FIS in memory
 * (its type byte cleared after each look) followed by one PxSACT read, which works the same
 * on every AHCI implementation that posts SDB FISes. Sectors written carry their own number
 * in their first 8 bytes, as with vblk.
 */
#define GUEST_NAME "vahci"
#include "runtime.h"

/* Guest-physical work area (identity-mapped): command list, FIS area, tables, data. */
#define CL_BASE    0x01000000ull     /* 32 command headers (1 KiB) */
#define FIS_BASE   0x01000400ull     /* FIS receive area (256 bytes) */
#define CT_BASE    0x01001000ull     /* command tables, 256 bytes each */
#define ID_BASE    0x01003000ull     /* IDENTIFY data */
#define DATA_BASE  0x02000000ull     /* 1 MiB for sequential, qd x 4 KiB for random */
#define MAX_QD     32

static u64 abar, port0;

/* -- AHCI ------------------------------------------------------------------------------ */
enum { CAP = 0x00, GHC = 0x04, IS = 0x08, PI = 0x0C };
enum { P_CLB = 0x00, P_CLBU = 0x04, P_FB = 0x08, P_FBU = 0x0C, P_IS = 0x10, P_IE = 0x14,
       P_CMD = 0x18, P_TFD = 0x20, P_SSTS = 0x28, P_SERR = 0x30, P_SACT = 0x34, P_CI = 0x38 };
enum { CMD_ST = 1, CMD_FRE = 1 << 4, CMD_FR = 1 << 14, CMD_CR = 1 << 15 };
#define IS_ERRORS 0x7D000000u      /* TFES, HBFS, HBDS, IFS, INFS, OFS */
enum { READ_FPDMA = 0x60, WRITE_FPDMA = 0x61, IDENTIFY = 0xEC };
#define SDB (FIS_BASE + 0x58)

static u32 preg(int off) { return rd32(port0 + off); }
static void pset(int off, u32 v) { wr32(port0 + off, v); }

static void wait_clear(int off, u32 bits, const char *what)
{
	for (u64 i = 0; preg(off) & bits; i++)
		if (i > 100000000ull)
			fail(what, preg(off));
}

/* The command header and table of slot s: one H2D FIS, one PRD entry. */
static void build(int s, u8 command, u64 lba, u32 count, int tag, u64 buf, u32 len, int write)
{
	u64 hdr = CL_BASE + 32ull * s, ct = CT_BASE + 256ull * s;
	wr32(hdr, 5 | (write ? 1u << 6 : 0) | 1u << 16);
	wr32(hdr + 4, 0);
	wr32(hdr + 8, (u32)ct);
	wr32(hdr + 12, (u32)(ct >> 32));
	volatile u8 *f = (volatile u8 *)ct;
	f[0] = 0x27; f[1] = 0x80; f[2] = command;
	f[4] = (u8)lba; f[5] = (u8)(lba >> 8); f[6] = (u8)(lba >> 16); f[7] = 0x40;
	f[8] = (u8)(lba >> 24); f[9] = (u8)(lba >> 32); f[10] = (u8)(lba >> 40);
	if (command == READ_FPDMA || command == WRITE_FPDMA) {
		f[3] = (u8)count; f[11] = (u8)(count >> 8);     /* sector count in FEATURES */
		f[12] = (u8)(tag << 3); f[13] = 0;
	} else {
		f[3] = 0; f[11] = 0;
		f[12] = (u8)count; f[13] = (u8)(count >> 8);
	}
	f[14] = 0; f[15] = 0;
	wr32(ct + 16, 0);
	wr64(ct + 0x80, buf);
	wr32(ct + 0x88, 0);
	wr32(ct + 0x8C, len - 1);
}

static void ahci_setup(void)
{
	int slot = pci_find_class(0x010601);
	if (slot < 0)
		fail("no AHCI controller on bus 0", 0);
	pci_enable(slot);
	abar = bar_address(slot, 5);
	wr32(abar + GHC, 1u << 31);
	wr32(abar + GHC, 1u << 31 | 1);                  /* HBA reset */
	for (u64 i = 0; rd32(abar + GHC) & 1; i++)
		if (i > 100000000ull)
			fail("GHC.HR did not clear", rd32(abar + GHC));
	wr32(abar + GHC, 1u << 31);                      /* AHCI mode, no interrupts: we poll */
	if (!(rd32(abar + PI) & 1))
		fail("port 0 not implemented", rd32(abar + PI));
	port0 = abar + 0x100;
	pset(P_CMD, preg(P_CMD) & ~CMD_ST);
	wait_clear(P_CMD, CMD_CR, "PxCMD.CR did not clear");
	pset(P_CMD, preg(P_CMD) & ~CMD_FRE);
	wait_clear(P_CMD, CMD_FR, "PxCMD.FR did not clear");
	for (u64 p = CL_BASE; p < CT_BASE + 256 * 32; p += 8)
		*(volatile u64 *)p = 0;
	pset(P_CLB, (u32)CL_BASE); pset(P_CLBU, 0);
	pset(P_FB, (u32)FIS_BASE); pset(P_FBU, 0);
	pset(P_SERR, 0xFFFFFFFFu);
	pset(P_IS, 0xFFFFFFFFu);
	pset(P_IE, 0);
	pset(P_CMD, preg(P_CMD) | CMD_FRE);
	if ((preg(P_SSTS) & 0xF) != 3)
		fail("no device on port 0", preg(P_SSTS));
	wait_clear(P_TFD, 0x88, "device busy");
	pset(P_CMD, preg(P_CMD) | CMD_ST);
}

static u64 capacity;             /* in 512-byte sectors */

static void identify(void)
{
	build(0, IDENTIFY, 0, 0, 0, ID_BASE, 512, 0);
	pset(P_CI, 1);
	for (u64 i = 0; preg(P_CI) & 1; i++) {
		if (preg(P_IS) & IS_ERRORS)
			fail("IDENTIFY failed, PxIS", preg(P_IS));
		if (i > 100000000ull)
			fail("IDENTIFY did not complete", preg(P_CI));
	}
	volatile u16 *w = (volatile u16 *)ID_BASE;
	if (!(w[76] & (1 << 8)))
		fail("the disk does not do NCQ", w[76]);
	capacity = (u64)w[100] | (u64)w[101] << 16 | (u64)w[102] << 32 | (u64)w[103] << 48;
	pset(P_IS, 0xFFFFFFFFu);
}

/* Issue the tags in mask (SACT then CI: two register writes for the whole batch). */
static void issue(u32 mask)
{
	barrier();
	pset(P_SACT, mask);
	pset(P_CI, mask);
}

/* Wait for completions: a Set Device Bits FIS lands in memory (we clear its type byte to see
 * the next), then PxSACT says which tags are done. Every so often the registers are read
 * anyway, so an error that sends no FIS is seen too. */
static u32 outstanding;

static u32 reap(void)
{
	for (u64 spins = 0;; spins++) {
		if (rd8(SDB) == 0xA1 || (spins & 0xFFFFF) == 0xFFFFF) {
			wr8(SDB, 0);
			barrier();
			if (rd8(SDB + 2) & 1)
				fail("NCQ command failed, error", rd8(SDB + 3));
			u32 done = outstanding & ~preg(P_SACT);
			if (done) {
				outstanding &= ~done;
				return done;
			}
			if ((spins & 0xFFFFF) == 0xFFFFF && (preg(P_IS) & IS_ERRORS))
				fail("port error, PxIS", preg(P_IS));
		}
		cpu_relax();
	}
}

static void sequential(int write, u64 mib)
{
	const char *name = write ? "write" : "read";
	u64 first = 0;
	if (mib * 2048 > capacity)
		fail("disk too small for seq_mib", capacity);
	begin_test(name);
	for (u64 m = 0; m < mib; m++) {
		if (write)
			fill_sectors(DATA_BASE, m * 2048, MiB);
		build(0, write ? WRITE_FPDMA : READ_FPDMA, m * 2048, 2048, 0, DATA_BASE, MiB, write);
		outstanding = 1;
		issue(1);
		reap();
		if (!write && m == 0)
			first = *(volatile u64 *)DATA_BASE;
	}
	end_test(name, "ios", mib, mib * MiB);
	if (!write) {
		put("vahci: sector 0 starts with ");
		putu(first);
		flush_line();
	}
}

static void random_io(int write, u64 ios, int qd)
{
	const char *name = write ? "randwrite" : "randread";
	u64 blocks = capacity / 8, issued = 0, completed = 0;
	u32 batch = 0;
	begin_test(name);
	for (int t = 0; t < qd && issued < ios; t++, issued++) {
		u64 sector = next_random() % blocks * 8;
		if (write)
			fill_sectors(DATA_BASE + 4096ull * t, sector, 4096);
		build(t, write ? WRITE_FPDMA : READ_FPDMA, sector, 8, t, DATA_BASE + 4096ull * t,
		      4096, write);
		batch |= 1u << t;
	}
	outstanding = batch;
	issue(batch);
	while (completed < issued) {
		u32 done = reap();
		batch = 0;
		for (int t = 0; t < 32; t++) {
			if (!(done & (1u << t)))
				continue;
			completed++;
			if (issued >= ios)
				continue;
			u64 sector = next_random() % blocks * 8;
			if (write)
				fill_sectors(DATA_BASE + 4096ull * t, sector, 4096);
			build(t, write ? WRITE_FPDMA : READ_FPDMA, sector, 8, t,
			      DATA_BASE + 4096ull * t, 4096, write);
			batch |= 1u << t;
			issued++;
		}
		if (batch) {
			outstanding |= batch;
			issue(batch);
		}
	}
	end_test(name, "ios", completed, completed * 4096);
}

static u64 seq_mib, rand_ios;
static int qd;

static void user_main(void)
{
	in_user = 1;
	if (has_test('r', 1))
		sequential(0, seq_mib);
	if (has_test('w', 1))
		sequential(1, seq_mib);
	if (has_test('R', 1))
		random_io(0, rand_ios, qd);
	if (has_test('W', 1))
		random_io(1, rand_ios, qd);
	put("vahci: done");
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
		fail("qd must be 1..32", (u64)qd);
	ahci_setup();
	identify();
	put("vahci: capacity=");
	putu(capacity);
	put(" ncq=32");
	flush_line();
	run_user(user_main);
}
