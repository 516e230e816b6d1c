/*
 * runtime.h: what every bare-metal native guest shares (all but lcheck.c, a Linux program).
 *
 * A guest is entered from entry.S: kernel_main() at CPL0 (port I/O, device set-up), which
 * calls enter_user() (here: run_user()) to run the hot loop at CPL3 with IOPL=3 and the low
 * 4 GiB identity-mapped. A guest file defines GUEST_NAME, the prefix of its console lines,
 * then includes this header and keeps only its device logic:
 *
 *	#define GUEST_NAME "vblk"
 *	#include "runtime.h"
 *
 * Here: the integer types, port I/O and MMIO accessors, memset/memcpy, the console (port
 * 0xE9) and the line being built (put/putu/puthex, flush_line: from user mode through a
 * ucall), the exit (port 0xF4: finish, fail), the default ucall and exception handlers, the
 * PVH command line (option, has_test, ...), PCI configuration space through ports
 * 0xCF8/0xCFC (finding a function, turning decoding on, placing a BAR), the "begin NAME" /
 * "end NAME ..." lines the host times, and a xorshift random number generator.
 *
 * A guest with more than one vCPU (ucheck) defines RUNTIME_PER_CPU: it then keeps its own
 * line buffers (struct line, one per CPU), ucall_handler() and fault_handler(), and gets
 * none of the single-CPU helpers (put, flush_line, finish, fail, the handlers, run_user).
 * LINE_SIZE sets the size of a line buffer (160 unless defined first). BAR_PLACE(slot, bar)
 * sets where bar_address() puts a BAR that firmware left unassigned or above 4 GiB.
 *
 * One translation unit per guest: everything here is static but memset/memcpy and the
 * handlers entry.S calls (ucall_handler, fault_handler); what a guest may not use is marked
 * unused so that -Wall -Wextra stay quiet. virtio.h (after this header) adds the virtio PCI
 * transport for the guests that drive a virtio device.
 */
#ifndef NATIVE_RUNTIME_H
#define NATIVE_RUNTIME_H

#ifndef GUEST_NAME
#error "define GUEST_NAME (the console prefix, e.g. \"vblk\") before including runtime.h"
#endif

#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

#define DEBUGCON 0xE9
#define DEBUG_EXIT 0xF4
#define MiB (1024 * 1024ull)
#define RT_UNUSED __attribute__((unused))

/* -- port I/O, MMIO, MSRs --------------------------------------------------------------- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void barrier(void) { __asm__ volatile("" : : : "memory"); }
static inline void cpu_relax(void) { __asm__ volatile("pause" : : : "memory"); }

static inline u8 rd8(u64 a) { return *(volatile u8 *)a; }
static inline u16 rd16(u64 a) { return *(volatile u16 *)a; }
static inline u32 rd32(u64 a) { return *(volatile u32 *)a; }
/* Two 32-bit accesses, low half first (what 64-bit device registers accept everywhere). */
static inline u64 rd64(u64 a) { return (u64)rd32(a) | (u64)rd32(a + 4) << 32; }
static inline void wr8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void wr16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void wr32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void wr64(u64 a, u64 v) { wr32(a, (u32)v); wr32(a + 4, (u32)(v >> 32)); }

static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return (u64)hi << 32 | lo;
}

static inline void wrmsr(u32 msr, u64 v)
{
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}

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

/* -- entry.S ---------------------------------------------------------------------------- */
/* ud2 with op and arg in rdi/rsi, keeping the callee-saved registers in memory across it —
 * returning to user mode from emulated kernel code, kvm-pvm hands back zeroed
 * general-purpose registers (seen under QEMU too), so only memory and RSP survive. RAX comes
 * back as the handler left it in the frame. */
extern u64 ucall(u64 op, u64 arg);
/* iretq to fn at CPL3 on stack_top (RFLAGS IF=0; enter_user_flags: the caller's RFLAGS). */
extern void enter_user(void (*fn)(void), u64 stack_top);
extern void enter_user_flags(void (*fn)(void), u64 stack_top, u64 rflags);
extern u32 start_info_paddr;         /* PVH: struct hvm_start_info, physical */

/* The ucalls every guest has; a guest's own start at UCALL_FIRST_FREE. */
enum { UCALL_PRINT = 1, UCALL_EXIT = 2, UCALL_FIRST_FREE = 3 };

/* Saved by ud_entry / irq_common in entry.S (pushed rax first, so r15 is lowest). */
struct frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 rip, cs, rflags, rsp, ss;
};

/* -- output: lines on the debug console; from user mode through a ucall ----------------- */
#ifndef LINE_SIZE
#define LINE_SIZE 160
#endif

struct line {
	char buf[LINE_SIZE];
	int len;
};

/* At CPL0. The lock keeps the lines of two vCPUs apart. */
static volatile int console_lock;

static RT_UNUSED void console_write(const char *s)
{
	while (__atomic_exchange_n(&console_lock, 1, __ATOMIC_ACQUIRE))
		cpu_relax();
	while (*s)
		outb(DEBUGCON, (u8)*s++);
	__atomic_store_n(&console_lock, 0, __ATOMIC_RELEASE);
}

static RT_UNUSED void line_put(struct line *l, const char *s)
{
	while (*s && l->len < (int)sizeof(l->buf) - 1)
		l->buf[l->len++] = *s++;
}

static RT_UNUSED void line_putu(struct line *l, u64 v)
{
	char buf[24];
	int i = 23;
	buf[i] = 0;
	do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v);
	line_put(l, buf + i);
}

static RT_UNUSED void line_puthex(struct line *l, u64 v)
{
	char buf[19] = "0x";
	for (int i = 0; i < 16; i++)
		buf[2 + i] = "0123456789abcdef"[(v >> (60 - 4 * i)) & 0xF];
	buf[18] = 0;
	line_put(l, buf);
}

/* Ends the line being built and writes it out: from user mode (user != 0) by a ucall. */
static RT_UNUSED void line_flush(struct line *l, int user)
{
	line_put(l, "\n");
	l->buf[l->len] = 0;
	if (user)
		ucall(UCALL_PRINT, (u64)(uintptr_t)l->buf);
	else
		console_write(l->buf);
	l->len = 0;
}

/* Ends the VM through the debug-exit port (from user mode by a ucall). */
static RT_UNUSED void __attribute__((noreturn)) exit_vm(int user, u8 code)
{
	if (user)
		ucall(UCALL_EXIT, code);
	outb(DEBUG_EXIT, code);
	for (;;)
		cpu_relax();
}

/* -- command line (PVH start_info) ------------------------------------------------------ */
static const char *cmdline;

/* At CPL0, first thing: the command line from the PVH start_info (none: every default). */
static RT_UNUSED void cmdline_init(void)
{
	if (start_info_paddr && rd32(start_info_paddr) == 0x336ec578)
		cmdline = (const char *)(uintptr_t)*(volatile u64 *)(u64)(start_info_paddr + 24);
}

/* What follows "key=" where key starts a word of the command line; 0: it is not there. */
static RT_UNUSED const char *option_str(const char *key)
{
	for (const char *p = cmdline; p && *p; p++) {
		const char *k = key, *q = p;
		while (*k && *q == *k) { k++; q++; }
		if (*k == 0 && *q == '=' && (p == cmdline || p[-1] == ' '))
			return q + 1;
	}
	return 0;
}

/* key=N, decimal (digits up to the first other character); dflt if key is not there. */
static RT_UNUSED u64 option(const char *key, u64 dflt)
{
	const char *q = option_str(key);
	if (!q)
		return dflt;
	u64 v = 0;
	for (; *q >= '0' && *q <= '9'; q++)
		v = v * 10 + (u64)(*q - '0');
	return v;
}

/* Is it key=value exactly (value the whole word)? */
static RT_UNUSED int option_is(const char *key, const char *value)
{
	const char *q = option_str(key);
	if (!q)
		return 0;
	const char *v = value;
	for (; *v && *q == *v; q++, v++)
		;
	return *v == 0 && (*q == 0 || *q == ' ');
}

/* key=A.B.C.D as a number (A in the top byte); 0 if key is not there. */
static RT_UNUSED u32 ip_option(const char *key)
{
	const char *q = option_str(key);
	u32 ip = 0, part = 0;
	if (!q)
		return 0;
	for (; (*q >= '0' && *q <= '9') || *q == '.'; q++) {
		if (*q == '.') {
			ip = ip << 8 | (part & 0xFF);
			part = 0;
		} else
			part = part * 10 + (u32)(*q - '0');
	}
	return ip << 8 | (part & 0xFF);
}

/* Does tests=... name test t? Without a tests= option: if_absent (1: all, 0: none). */
static RT_UNUSED int has_test(char t, int if_absent)
{
	const char *p = option_str("tests");
	if (!p)
		return if_absent;
	for (; *p && *p != ' '; p++)
		if (*p == t)
			return 1;
	return 0;
}

/* -- random numbers (xorshift64*) ------------------------------------------------------- */
static u64 rng = 0x9E3779B97F4A7C15ull;

static RT_UNUSED u64 next_random(void)
{
	rng ^= rng >> 12;
	rng ^= rng << 25;
	rng ^= rng >> 27;
	return rng * 0x2545F4914F6CDD1Dull;
}

/* Block guests: every 512-byte sector of buf starts with its own number, so the host can
 * check that data went where the guest said. */
static RT_UNUSED void fill_sectors(u64 buf, u64 first_sector, u64 bytes)
{
	for (u64 off = 0; off < bytes; off += 512)
		*(volatile u64 *)(buf + off) = first_sector + off / 512;
}

#ifndef RUNTIME_PER_CPU
/* -- one CPU: one line buffer, the default handlers, the user stack ---------------------- */
static int in_user;                  /* set by the guest's user_main: print through ucalls */
static struct line console_line;

static RT_UNUSED void put(const char *s) { line_put(&console_line, s); }
static RT_UNUSED void putu(u64 v) { line_putu(&console_line, v); }
static RT_UNUSED void puthex(u64 v) { line_puthex(&console_line, v); }
static RT_UNUSED void flush_line(void) { line_flush(&console_line, in_user); }
static RT_UNUSED void __attribute__((noreturn)) finish(u8 code) { exit_vm(in_user, code); }

/* "NAME: error: WHY 0xVALUE", then exit 1. */
static RT_UNUSED void __attribute__((noreturn)) fail(const char *why, u64 value)
{
	put(GUEST_NAME ": error: ");
	put(why);
	put(" ");
	puthex(value);
	flush_line();
	finish(1);
}

/* The timed sections: "begin NAME", then "end NAME UNIT=N bytes=B". */
static RT_UNUSED void begin_test(const char *name)
{
	put("begin ");
	put(name);
	flush_line();
}

static RT_UNUSED void end_test(const char *name, const char *unit, u64 n, u64 bytes)
{
	put("end ");
	put(name);
	put(" ");
	put(unit);
	put("=");
	putu(n);
	put(" bytes=");
	putu(bytes);
	flush_line();
}

/* #UD from user mode: a ucall (entry.S's ud_entry). */
void ucall_handler(struct frame *f)
{
	if (f->rdi == UCALL_PRINT)
		console_write((const char *)(uintptr_t)f->rsi);
	else if (f->rdi == UCALL_EXIT)
		outb(DEBUG_EXIT, (u8)f->rsi);
	else {
		console_write(GUEST_NAME ": unexpected #UD\n");
		outb(DEBUG_EXIT, 1);
	}
	f->rip += 2;
}

/* Any other exception: "NAME: exception VECTOR at RIP CS" (stack: the CPU's frame, after
 * an error code if the vector has one), then exit 1. */
void __attribute__((noreturn)) fault_handler(u64 vector, u64 *stack)
{
	in_user = 0;
	put(GUEST_NAME ": exception ");
	putu(vector);
	put(" at ");
	puthex(stack[0]);
	put(" ");
	puthex(stack[1]);
	flush_line();
	finish(1);
}

static u8 user_stack[65536] __attribute__((aligned(16)));

/* From kernel_main: run fn at CPL3 (interrupts off) on the user stack; never returns. */
static RT_UNUSED void run_user(void (*fn)(void))
{
	enter_user(fn, (u64)(uintptr_t)(user_stack + sizeof(user_stack)));
}
#endif /* !RUNTIME_PER_CPU */

/* -- PCI, bus 0, configuration mechanism #1 (ports 0xCF8/0xCFC) ------------------------- */
static RT_UNUSED u32 pci_read(int slot, int off)
{
	outl(0xCF8, 0x80000000u | (u32)slot << 11 | (u32)(off & 0xFC));
	return inl(0xCFC) >> ((off & 3) * 8);
}

static RT_UNUSED void pci_write32(int slot, int off, u32 v)
{
	outl(0xCF8, 0x80000000u | (u32)slot << 11 | (u32)(off & 0xFC));
	outl(0xCFC, v);
}

/* The first slot whose vendor | device << 16 is id; -1: none. */
static RT_UNUSED int pci_find_id(u32 id)
{
	for (int s = 0; s < 32; s++)
		if (pci_read(s, 0) == id)
			return s;
	return -1;
}

/* The first slot with class code cls (class << 16 | subclass << 8 | prog-if); -1: none. */
static RT_UNUSED int pci_find_class(u32 cls)
{
	for (int s = 0; s < 32; s++)
		if (pci_read(s, 0) != 0xFFFFFFFFu && (pci_read(s, 8) >> 8) == cls)
			return s;
	return -1;
}

/* Memory decoding and bus mastering on (firmware may have left them off); the status
 * register's write-1-to-clear bits are written as 0. */
static RT_UNUSED void pci_enable(int slot)
{
	pci_write32(slot, 0x04, (pci_read(slot, 0x04) & 0xFFFF) | 0x6);
}

#ifndef BAR_PLACE
/* Where firmware would put BAR bar of slot (entry.S maps 0xC0000000.. with 4 KiB pages). */
#define BAR_PLACE(slot, bar) (0xC0000000ull + ((u64)(slot) << 20) + ((u64)(bar) << 16))
#endif

#ifndef RUNTIME_PER_CPU
/* A memory BAR's address; one left unassigned (0) by firmware, or above 4 GiB (out of
 * entry.S's map), is moved to BAR_PLACE(slot, bar). */
static RT_UNUSED u64 bar_address(int slot, int bar)
{
	int off = 0x10 + 4 * bar;
	u32 lo = pci_read(slot, off);
	if (lo & 1)
		fail("BAR is an I/O BAR", (u64)bar);
	int is64 = (lo & 6) == 4;
	u64 addr = lo & ~0xFull;
	if (is64)
		addr |= (u64)pci_read(slot, off + 4) << 32;
	if (addr == 0 || addr >= (4ull << 30)) {
		addr = BAR_PLACE(slot, bar);
		pci_write32(slot, off, (u32)addr | (lo & 0xF));
		if (is64)
			pci_write32(slot, off + 4, 0);
	}
	if (addr >= (4ull << 30))
		fail("BAR not below 4 GiB", addr);
	return addr;
}
#endif

#endif /* NATIVE_RUNTIME_H */
