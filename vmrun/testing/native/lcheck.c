/*
 * lcheck: ucheck's register and memory checks as a Linux process (issue 8).
 *
 * A static x86-64 Linux program without libc (built by the host's gcc, copied into the
 * default guest by bench/guest_integrity.py). Run for SECS seconds (argv[1], default 60),
 * usually two at once beside the shell's md5sum loop, so the guest kernel switches between
 * processes whose XMM, GPR and FS-base contents differ. Each round:
 *
 *   regs   all GPRs but RSP and XMM0-15 hold this process's values across a spin of
 *          ~1 ms of user-mode work (timer interrupts and context switches arrive in it)
 *   sys    the same across a getppid() system call (RCX, R11, RAX excepted), which on kvm-pvm
 *          goes through vmrun's syscall fix-up
 *   fs     %fs:0 reads the marker at the FS base set by arch_prctl(ARCH_SET_FS)
 *   mem    a 1 MiB buffer holds what the previous round wrote (page per page)
 *   cow    every 64 rounds a fork: the child checks the buffer it shares copy-on-write,
 *          scribbles over it and exits; the parent's copy must be unchanged
 *
 * At the end one line on stdout: "L pid=P rounds=N regs=.. sys=.. fs=.. mem=.. cow=.."
 * (mismatch counts; the first of each kind is described on a line of its own).
 */
typedef unsigned long u64;
typedef unsigned int u32;

static long sys3(long n, long a, long b, long c)
{
	long r;
	__asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return r;
}

static long sys4(long n, long a, long b, long c, long d)
{
	long r;
	register long r10 __asm__("r10") = d;
	__asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10)
			 : "rcx", "r11", "memory");
	return r;
}

enum { SYS_write = 1, SYS_getpid = 39, SYS_fork = 57, SYS_exit = 60, SYS_wait4 = 61,
       SYS_getppid = 110, SYS_arch_prctl = 158, SYS_clock_gettime = 228 };

static char out[512];
static int out_len;

static void put(const char *s)
{
	while (*s && out_len < (int)sizeof(out) - 1)
		out[out_len++] = *s++;
}

static void putu(u64 v)
{
	char b[24];
	int i = 23;
	b[i] = 0;
	do { b[--i] = (char)('0' + v % 10); v /= 10; } while (v);
	put(b + i);
}

static void puthex(u64 v)
{
	char b[19] = "0x";
	for (int i = 0; i < 16; i++)
		b[2 + i] = "0123456789abcdef"[(v >> (60 - 4 * i)) & 0xF];
	b[18] = 0;
	put(b);
}

static void flush(void)
{
	put("\n");
	sys3(SYS_write, 1, (long)out, out_len);
	out_len = 0;
}

static u64 now_s(void)
{
	u64 ts[2];
	sys3(SYS_clock_gettime, 1, (long)ts, 0);      /* CLOCK_MONOTONIC */
	return ts[0];
}

/* window(iters, gpr_out, xmm_out, base, mode, xmm_in): XMM0-15 from xmm_in, GPRs but RSP
   base + 1000 + i; then iters times every GPR +1 and XMM0-14 += XMM15 (a state restored from
   an older snapshot shows); mode 1 then does one getppid; then all are stored. */
extern void window(u64 iters, u64 *gpr, u64 *xmm, u64 base, u64 mode, const u64 *xmm_in);
__asm__(
	".text\n"
	".globl window\n"
	"window:\n"
	"	push %rbx\n push %rbp\n push %r12\n push %r13\n push %r14\n push %r15\n"
	"	push %rdx\n"                      /* 32(%rsp) xmm out */
	"	push %rsi\n"                      /* 24(%rsp) gpr out */
	"	push %rcx\n"                      /* 16(%rsp) base */
	"	push %r8\n"                       /*  8(%rsp) mode */
	"	push %rdi\n"                      /*  0(%rsp) counter */
	"	movdqu 0(%r9), %xmm0\n movdqu 16(%r9), %xmm1\n movdqu 32(%r9), %xmm2\n"
	"	movdqu 48(%r9), %xmm3\n movdqu 64(%r9), %xmm4\n movdqu 80(%r9), %xmm5\n"
	"	movdqu 96(%r9), %xmm6\n movdqu 112(%r9), %xmm7\n movdqu 128(%r9), %xmm8\n"
	"	movdqu 144(%r9), %xmm9\n movdqu 160(%r9), %xmm10\n movdqu 176(%r9), %xmm11\n"
	"	movdqu 192(%r9), %xmm12\n movdqu 208(%r9), %xmm13\n movdqu 224(%r9), %xmm14\n"
	"	movdqu 240(%r9), %xmm15\n"
	"	lea 1000(%rcx), %rax\n lea 1001(%rcx), %rbx\n lea 1003(%rcx), %rdx\n"
	"	lea 1004(%rcx), %rsi\n lea 1005(%rcx), %rdi\n lea 1006(%rcx), %rbp\n"
	"	lea 1007(%rcx), %r8\n lea 1008(%rcx), %r9\n lea 1009(%rcx), %r10\n"
	"	lea 1010(%rcx), %r11\n lea 1011(%rcx), %r12\n lea 1012(%rcx), %r13\n"
	"	lea 1013(%rcx), %r14\n lea 1014(%rcx), %r15\n lea 1002(%rcx), %rcx\n"
	"1:	add $1, %rax\n add $1, %rbx\n add $1, %rcx\n add $1, %rdx\n add $1, %rsi\n"
	"	add $1, %rdi\n add $1, %rbp\n add $1, %r8\n add $1, %r9\n add $1, %r10\n"
	"	add $1, %r11\n add $1, %r12\n add $1, %r13\n add $1, %r14\n add $1, %r15\n"
	"	paddq %xmm15, %xmm0\n paddq %xmm15, %xmm1\n paddq %xmm15, %xmm2\n"
	"	paddq %xmm15, %xmm3\n paddq %xmm15, %xmm4\n paddq %xmm15, %xmm5\n"
	"	paddq %xmm15, %xmm6\n paddq %xmm15, %xmm7\n paddq %xmm15, %xmm8\n"
	"	paddq %xmm15, %xmm9\n paddq %xmm15, %xmm10\n paddq %xmm15, %xmm11\n"
	"	paddq %xmm15, %xmm12\n paddq %xmm15, %xmm13\n paddq %xmm15, %xmm14\n"
	"	decq (%rsp)\n"
	"	jnz 1b\n"
	"	cmpq $0, 8(%rsp)\n"
	"	je 3f\n"
	"2:	mov %rax, (%rsp)\n"
	"	mov $110, %eax\n"                 /* getppid (RCX, R11: the syscall's) */
	"	syscall\n"
	"	mov (%rsp), %rax\n"
	"3:	xchg %rax, 24(%rsp)\n"
	"	mov %rbx, 8(%rax)\n mov %rcx, 16(%rax)\n mov %rdx, 24(%rax)\n mov %rsi, 32(%rax)\n"
	"	mov %rdi, 40(%rax)\n mov %rbp, 48(%rax)\n mov %r8, 56(%rax)\n mov %r9, 64(%rax)\n"
	"	mov %r10, 72(%rax)\n mov %r11, 80(%rax)\n mov %r12, 88(%rax)\n mov %r13, 96(%rax)\n"
	"	mov %r14, 104(%rax)\n mov %r15, 112(%rax)\n"
	"	mov 24(%rsp), %rbx\n mov %rbx, 0(%rax)\n"
	"	mov 32(%rsp), %rax\n"
	"	movdqu %xmm0, 0(%rax)\n movdqu %xmm1, 16(%rax)\n movdqu %xmm2, 32(%rax)\n"
	"	movdqu %xmm3, 48(%rax)\n movdqu %xmm4, 64(%rax)\n movdqu %xmm5, 80(%rax)\n"
	"	movdqu %xmm6, 96(%rax)\n movdqu %xmm7, 112(%rax)\n movdqu %xmm8, 128(%rax)\n"
	"	movdqu %xmm9, 144(%rax)\n movdqu %xmm10, 160(%rax)\n movdqu %xmm11, 176(%rax)\n"
	"	movdqu %xmm12, 192(%rax)\n movdqu %xmm13, 208(%rax)\n movdqu %xmm14, 224(%rax)\n"
	"	movdqu %xmm15, 240(%rax)\n"
	"	add $40, %rsp\n"
	"	pop %r15\n pop %r14\n pop %r13\n pop %r12\n pop %rbp\n pop %rbx\n"
	"	ret\n");

static const char *const gpr_name[15] = {"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8",
	"r9", "r10", "r11", "r12", "r13", "r14", "r15"};
static u64 base, rounds, bad_regs, bad_sys, bad_fs, bad_mem, bad_cow, reported;
static u64 xmm_in[32];
static u64 tls[4];
#define BUF_WORDS (1024 * 1024 / 8)
static u64 buf[BUF_WORDS];

static int first(int kind, const char *what)
{
	if (reported & (1u << kind))
		return 0;
	reported |= 1u << kind;
	put("L first ");
	put(what);
	put(" mismatch pid=");
	putu((u64)sys3(SYS_getpid, 0, 0, 0));
	put(" round=");
	putu(rounds);
	put(": ");
	return 1;
}

static void check_window(u64 mode)
{
	u64 g[15], x[32];
	static u64 calls;
	u64 k = ++calls % 1024, n = mode ? 1 + k : 100000 + k, xwant[32];   /* never the same */
	for (int i = 0; i < 32; i++)
		xwant[i] = xmm_in[i] + (i < 30 ? n * xmm_in[30 + (i & 1)] : 0);
	window(n, g, x, base, mode, xmm_in);
	int bad = 0;
	for (int i = 0; i < 15; i++) {
		if (mode && (i == 0 || i == 2 || i == 10))
			continue;                 /* RAX (restored by hand), RCX, R11: the syscall's */
		if (g[i] != base + 1000 + (u64)i + n) {
			if (!bad && first(mode ? 1 : 0, mode ? "sys" : "regs")) {
				put(gpr_name[i]);
				put("=");
				puthex(g[i]);
				put(" want ");
				puthex(base + 1000 + (u64)i + n);
				flush();
			}
			bad = 1;
		}
	}
	for (int i = 0; i < 32; i++)
		if (x[i] != xwant[i]) {
			if (!bad && first(mode ? 1 : 0, mode ? "sys xmm" : "xmm")) {
				put("xmm");
				putu((u64)i / 2);
				put(i & 1 ? ".hi=" : ".lo=");
				puthex(x[i]);
				put(" want ");
				puthex(xwant[i]);
				flush();
			}
			bad = 1;
			break;
		}
	if (bad)
		*(mode ? &bad_sys : &bad_regs) += 1;
}

static void check_fs(void)
{
	u64 v;
	__asm__ volatile("mov %%fs:0, %0" : "=r"(v));
	if (v != tls[0]) {
		if (first(2, "fs")) {
			put("%fs:0=");
			puthex(v);
			put(" want ");
			puthex(tls[0]);
			flush();
		}
		bad_fs++;
	}
}

static u64 check_buf(u64 gen, int kind)
{
	u64 bad = 0;
	for (u64 i = 0; i < BUF_WORDS; i += 512) {        /* one word per 4 KiB page */
		u64 want = (gen << 20) ^ i ^ base;
		if (buf[i] != want) {
			if (!bad && first(kind, kind == 3 ? "mem" : "cow")) {
				put("page ");
				putu(i / 512);
				put(" holds ");
				puthex(buf[i]);
				put(" want ");
				puthex(want);
				flush();
			}
			bad++;
		}
	}
	return bad;
}

static void fill_buf(u64 gen)
{
	for (u64 i = 0; i < BUF_WORDS; i += 512)
		buf[i] = (gen << 20) ^ i ^ base;
}

static void cow_round(void)
{
	long pid = sys3(SYS_fork, 0, 0, 0);
	if (pid == 0) {
		u64 b = check_buf(rounds, 4);
		fill_buf(rounds + 12345);                 /* the child's own copy */
		sys3(SYS_exit, b ? 1 : 0, 0, 0);
	}
	int status = 0;
	sys4(SYS_wait4, pid, (long)&status, 0, 0);
	if (status != 0)
		bad_cow++;
	bad_cow += check_buf(rounds, 4) ? 1 : 0;           /* the parent's copy unchanged */
}

void __attribute__((used)) lmain(long argc, char **argv)
{
	u64 secs = 60;
	if (argc > 1) {
		secs = 0;
		for (const char *p = argv[1]; *p >= '0' && *p <= '9'; p++)
			secs = secs * 10 + (u64)(*p - '0');
	}
	base = ((u64)sys3(SYS_getpid, 0, 0, 0) << 40) | 0x5a5a0000;
	for (int i = 0; i < 32; i++)
		xmm_in[i] = base * (u64)(i + 3) ^ 0x1111111111111111ull * (u64)(i % 15);
	tls[0] = base ^ 0xf5f5f5f5f5f5f5f5ull;
	sys3(SYS_arch_prctl, 0x1002, (long)tls, 0);        /* ARCH_SET_FS */
	u64 end = now_s() + secs;
	fill_buf(0);
	while (now_s() < end) {
		rounds++;
		check_window(0);
		check_window(1);
		check_fs();
		bad_mem += check_buf(rounds - 1, 3) ? 1 : 0;
		fill_buf(rounds);
		if (rounds % 64 == 0)
			cow_round();
	}
	put("L pid=");
	putu((u64)sys3(SYS_getpid, 0, 0, 0));
	put(" rounds=");
	putu(rounds);
	put(" regs=");
	putu(bad_regs);
	put(" sys=");
	putu(bad_sys);
	put(" fs=");
	putu(bad_fs);
	put(" mem=");
	putu(bad_mem);
	put(" cow=");
	putu(bad_cow);
	flush();
	sys3(SYS_exit, 0, 0, 0);
}

/* The process entry: argc, argv on the stack; no libc, no TLS until arch_prctl. */
__asm__(
	".text\n"
	".globl _start\n"
	"_start:\n"
	"	mov (%rsp), %rdi\n"
	"	lea 8(%rsp), %rsi\n"
	"	and $-16, %rsp\n"
	"	call lmain\n"
	"	hlt\n");
