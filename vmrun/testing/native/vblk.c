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
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

#define DEBUGCON 0xE9
#define DEBUG_EXIT 0xF4
#define MiB (1024 * 1024)

/* Guest-physical work area (identity-mapped): queue, headers, status bytes, data buffers. */
#define QUEUE_BASE 0x01000000ull
#define HDR_BASE   0x01100000ull
#define DATA_BASE  0x02000000ull     /* 1 MiB for sequential, qd x 4 KiB for random */
#define MAX_QSIZE  256
#define MAX_QD     64

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

static u64 common, notify_addr, devcfg;
static u16 qsize;

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
	put("vblk: error: ");
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
		console_write("vblk: unexpected #UD\n");
		outb(DEBUG_EXIT, 1);
	}
	f->rip += 2;
}

void __attribute__((noreturn)) fault_handler(u64 vector, u64 *stack)
{
	in_user = 0;
	put("vblk: exception ");
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
		fail("virtio capability in an I/O BAR", (u64)bar);
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

/* -- virtio --------------------------------------------------------------------------- */
enum { COMMON_CFG = 1, NOTIFY_CFG = 2, DEVICE_CFG = 4 };
/* struct virtio_pci_common_cfg offsets */
enum {
	DFSELECT = 0x00, DF = 0x04, GFSELECT = 0x08, GF = 0x0C, NUM_QUEUES = 0x12,
	STATUS = 0x14, Q_SELECT = 0x16, Q_SIZE = 0x18, Q_MSIX = 0x1A, Q_ENABLE = 0x1C,
	Q_NOTIFY_OFF = 0x1E, Q_DESC = 0x20, Q_DRIVER = 0x28, Q_DEVICE = 0x30,
};
enum { S_ACK = 1, S_DRIVER = 2, S_DRIVER_OK = 4, S_FEATURES_OK = 8 };
enum { F_NEXT = 1, F_WRITE = 2 };
enum { T_IN = 0, T_OUT = 1 };

struct desc { u64 addr; u32 len; u16 flags; u16 next; };
struct req_hdr { u32 type; u32 reserved; u64 sector; };

static volatile struct desc *descs;
static volatile u16 *avail;      /* flags, idx, ring[qsize] */
static volatile u16 *used;       /* flags, idx, then {u32 id, u32 len}[qsize] */
static u16 avail_idx, used_seen;

static void virtio_setup(void)
{
	int slot = -1;
	for (int s = 0; s < 32 && slot < 0; s++) {
		u32 id = pci_read(s, 0);
		if ((id & 0xFFFF) == 0x1AF4 && ((id >> 16) == 0x1042 || (id >> 16) == 0x1001))
			slot = s;
	}
	if (slot < 0)
		fail("no virtio-blk on bus 0", 0);
	/* Memory decoding and bus mastering on (firmware may have left them off). */
	pci_write32(slot, 0x04, (pci_read(slot, 0x04) & 0xFFFF) | 0x6);
	u32 mult = 0;
	for (int p = pci_read(slot, 0x34) & 0xFC, n = 0; p && n < 48; p = pci_read(slot, p + 1) & 0xFC, n++) {
		if ((pci_read(slot, p) & 0xFF) != 0x09)
			continue;
		int type = pci_read(slot, p + 3) & 0xFF;
		u64 base = bar_address(slot, pci_read(slot, p + 4) & 0xFF) + pci_read(slot, p + 8);
		if (type == COMMON_CFG && !common)
			common = base;
		else if (type == NOTIFY_CFG && !notify_addr) {
			notify_addr = base;
			mult = pci_read(slot, p + 16);
		} else if (type == DEVICE_CFG && !devcfg)
			devcfg = base;
	}
	if (!common || !notify_addr || !devcfg)
		fail("virtio capabilities missing on slot", (u64)slot);

	wr8(common + STATUS, 0);
	while (rd8(common + STATUS))
		cpu_relax();
	wr8(common + STATUS, S_ACK | S_DRIVER);
	wr32(common + DFSELECT, 1);
	if (!(rd32(common + DF) & 1))
		fail("device does not offer VIRTIO_F_VERSION_1", 0);
	wr32(common + GFSELECT, 0);
	wr32(common + GF, 0);
	wr32(common + GFSELECT, 1);
	wr32(common + GF, 1);
	wr8(common + STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
	if (!(rd8(common + STATUS) & S_FEATURES_OK))
		fail("FEATURES_OK refused", rd8(common + STATUS));

	wr16(common + Q_SELECT, 0);
	qsize = rd16(common + Q_SIZE);
	if (qsize == 0)
		fail("queue 0 has size 0", 0);
	if (qsize > MAX_QSIZE)
		qsize = MAX_QSIZE;
	wr16(common + Q_SIZE, qsize);
	wr16(common + Q_MSIX, 0xFFFF);
	u64 d = QUEUE_BASE, a = d + 16ull * qsize, u = (a + 6 + 2ull * qsize + 3) & ~3ull;
	for (u64 p = QUEUE_BASE; p < u + 6 + 8ull * qsize; p += 8)
		*(volatile u64 *)p = 0;
	descs = (volatile struct desc *)d;
	avail = (volatile u16 *)a;
	used = (volatile u16 *)u;
	avail[0] = 1;            /* VIRTQ_AVAIL_F_NO_INTERRUPT: we poll the used ring */
	wr64(common + Q_DESC, d);
	wr64(common + Q_DRIVER, a);
	wr64(common + Q_DEVICE, u);
	notify_addr += (u64)rd16(common + Q_NOTIFY_OFF) * mult;
	wr16(common + Q_ENABLE, 1);
	wr8(common + STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
}

/* -- requests --------------------------------------------------------------------------- */
static u64 capacity;             /* in 512-byte sectors */
static u64 rng = 0x9E3779B97F4A7C15ull;

static u64 next_random(void)
{
	rng ^= rng >> 12;
	rng ^= rng << 25;
	rng ^= rng >> 27;
	return rng * 0x2545F4914F6CDD1Dull;
}

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
	descs[d] = (struct desc){(u64)(uintptr_t)h, 16, F_NEXT, (u16)(d + 1)};
	descs[d + 1] = (struct desc){buf, len, (u16)(F_NEXT | (type == T_IN ? F_WRITE : 0)),
				     (u16)(d + 2)};
	descs[d + 2] = (struct desc){(u64)(uintptr_t)status, 1, F_WRITE, 0};
	avail[2 + avail_idx % qsize] = (u16)d;
	avail_idx++;
}

static void kick(void)
{
	barrier();
	avail[1] = avail_idx;
	barrier();
	wr16(notify_addr, 0);
}

/* Wait for at least one completion; returns how many, their slots in done[].
 * The used index may only move forward, by at most what we have in flight: anything else is
 * a device that published it non-atomically (vmrun once did) and is reported as such. */
static int reap(int *done)
{
	u16 idx;
	while ((idx = used[1]) == used_seen)
		cpu_relax();
	barrier();
	if ((u16)(idx - used_seen) > MAX_QD) {
		put("vblk: used ring: read idx ");
		putu(idx);
		put(" then ");
		putu(used[1]);
		put(", seen ");
		putu(used_seen);
		put(", ring at ");
		puthex((u64)(uintptr_t)used);
		flush_line();
		fail("used index moved backwards or too far", idx);
	}
	int n = 0;
	volatile u32 *elems = (volatile u32 *)(used + 2);
	while (used_seen != idx) {
		u32 id = elems[2 * (used_seen % qsize)];
		if (id % 3 || id / 3 >= MAX_QD)
			fail("used ring names a descriptor we did not post", id);
		int i = (int)(id / 3);
		u8 st = *(volatile u8 *)(HDR_BASE + 0x8000 + i);
		if (st != 0)
			fail("request failed with status", st);
		done[n++] = i;
		used_seen++;
	}
	return n;
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

static void sequential(int type, u64 mib)
{
	const char *name = type == T_IN ? "read" : "write";
	int done[MAX_QD];
	u64 first = 0;
	if (mib * 2048 > capacity)
		fail("disk too small for seq_mib", capacity);
	begin(name);
	for (u64 m = 0; m < mib; m++) {
		if (type == T_OUT)
			fill_sectors(DATA_BASE, m * 2048, MiB);
		submit(0, type, m * 2048, DATA_BASE, MiB);
		kick();
		reap(done);
		if (type == T_IN && m == 0)
			first = *(volatile u64 *)DATA_BASE;
	}
	end(name, mib, mib * MiB);
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
	begin(name);
	for (int i = 0; i < qd && issued < ios; i++, issued++) {
		u64 sector = next_random() % blocks * 8;
		if (type == T_OUT)
			fill_sectors(DATA_BASE + 4096ull * i, sector, 4096);
		submit(i, type, sector, DATA_BASE + 4096ull * i, 4096);
	}
	kick();
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
		kick();
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
		sequential(T_IN, seq_mib);
	if (has_test(cmdline, 'w'))
		sequential(T_OUT, seq_mib);
	if (has_test(cmdline, 'R'))
		random_io(T_IN, rand_ios, qd);
	if (has_test(cmdline, 'W'))
		random_io(T_OUT, rand_ios, qd);
	put("vblk: done");
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
		fail("qd must be 1..64", (u64)qd);
	virtio_setup();
	capacity = (u64)rd32(devcfg) | (u64)rd32(devcfg + 4) << 32;
	if ((u64)qd * 3 > qsize)
		fail("queue too small for qd", qsize);
	put("vblk: capacity=");
	putu(capacity);
	put(" qsize=");
	putu(qsize);
	flush_line();
	enter_user(user_main, (u64)(uintptr_t)(user_stack + sizeof(user_stack)));
}
