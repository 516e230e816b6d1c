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
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

#define DEBUGCON 0xE9
#define DEBUG_EXIT 0xF4
#define MiB (1024 * 1024)

/* Guest-physical work area (identity-mapped): command list, FIS area, tables, data. */
#define CL_BASE    0x01000000ull     /* 32 command headers (1 KiB) */
#define FIS_BASE   0x01000400ull     /* FIS receive area (256 bytes) */
#define CT_BASE    0x01001000ull     /* command tables, 256 bytes each */
#define ID_BASE    0x01003000ull     /* IDENTIFY data */
#define DATA_BASE  0x02000000ull     /* 1 MiB for sequential, qd x 4 KiB for random */
#define MAX_QD     32

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

static u64 abar, port0;

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
	put("vahci: error: ");
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
		console_write("vahci: unexpected #UD\n");
		outb(DEBUG_EXIT, 1);
	}
	f->rip += 2;
}

void __attribute__((noreturn)) fault_handler(u64 vector, u64 *stack)
{
	in_user = 0;
	put("vahci: exception ");
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
		fail("BAR is an I/O BAR", (u64)bar);
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
	int slot = -1;
	for (int s = 0; s < 32 && slot < 0; s++)
		if (pci_read(s, 0) != 0xFFFFFFFFu && (pci_read(s, 8) >> 8) == 0x010601)
			slot = s;
	if (slot < 0)
		fail("no AHCI controller on bus 0", 0);
	pci_write32(slot, 0x04, (pci_read(slot, 0x04) & 0xFFFF) | 0x6);
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
static u64 rng = 0x9E3779B97F4A7C15ull;

static u64 next_random(void)
{
	rng ^= rng >> 12;
	rng ^= rng << 25;
	rng ^= rng >> 27;
	return rng * 0x2545F4914F6CDD1Dull;
}

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

static void fill_sectors(u64 buf, u64 first_sector, u64 bytes)
{
	for (u64 off = 0; off < bytes; off += 512)
		*(volatile u64 *)(buf + off) = first_sector + off / 512;
}

static void begin(const char *name)
{
	put("begin ");
	put(name);
	flush_line();
}

static void end(const char *name, u64 ios, u64 bytes)
{
	put("end ");
	put(name);
	put(" ios=");
	putu(ios);
	put(" bytes=");
	putu(bytes);
	flush_line();
}

static void sequential(int write, u64 mib)
{
	const char *name = write ? "write" : "read";
	u64 first = 0;
	if (mib * 2048 > capacity)
		fail("disk too small for seq_mib", capacity);
	begin(name);
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
	end(name, mib, mib * MiB);
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
	begin(name);
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
	end(name, completed, completed * 4096);
}

/* -- command line (PVH start_info) ----------------------------------------------------- */
extern u32 start_info_paddr;

static u64 option(const char *cmdline, const char *key, u64 dflt)
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

static int has_test(const char *cmdline, char t)
{
	for (const char *p = cmdline; p && *p; p++) {
		if (p[0] == 't' && p[1] == 'e' && p[2] == 's' && p[3] == 't' && p[4] == 's' &&
		    p[5] == '=' && (p == cmdline || p[-1] == ' ')) {
			for (p += 6; *p && *p != ' '; p++)
				if (*p == t)
					return 1;
			return 0;
		}
	}
	return 1;
}

static const char *cmdline;
static u64 seq_mib, rand_ios;
static int qd;
extern void enter_user(void (*fn)(void), u64 stack_top);
static u8 user_stack[65536] __attribute__((aligned(16)));

static void user_main(void)
{
	in_user = 1;
	if (has_test(cmdline, 'r'))
		sequential(0, seq_mib);
	if (has_test(cmdline, 'w'))
		sequential(1, seq_mib);
	if (has_test(cmdline, 'R'))
		random_io(0, rand_ios, qd);
	if (has_test(cmdline, 'W'))
		random_io(1, rand_ios, qd);
	put("vahci: done");
	flush_line();
	finish(0);
}

/* CPL0: read the options, set the device up (port I/O), then run the tests at CPL3. */
void kernel_main(void)
{
	if (start_info_paddr && rd32(start_info_paddr) == 0x336ec578)
		cmdline = (const char *)(uintptr_t)*(volatile u64 *)(u64)(start_info_paddr + 24);
	seq_mib = option(cmdline, "seq_mib", 64);
	rand_ios = option(cmdline, "rand_ios", 20000);
	qd = (int)option(cmdline, "qd", 32);
	if (qd < 1 || qd > MAX_QD)
		fail("qd must be 1..32", (u64)qd);
	ahci_setup();
	identify();
	put("vahci: capacity=");
	putu(capacity);
	put(" ncq=32");
	flush_line();
	enter_user(user_main, (u64)(uintptr_t)(user_stack + sizeof(user_stack)));
}
