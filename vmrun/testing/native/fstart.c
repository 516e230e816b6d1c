/*
 * fstart: glibc's static start-up in miniature, as a Linux program (issue 8).
 *
 * Fresh busybox processes in the default guest die at start-up with `segfault at 0` in
 * glibc's __ctype_init: the per-thread locale pointer, which the start-up code had just
 * copied into a fresh TLS block from sbrk, reads 0 (the TCB on the same page, written later
 * with plain stores, is right). They do so mostly when another program is runnable beside
 * them (README, "This host's KVM"). This program does what that start-up does and nothing
 * else: it grows the heap with brk(), copies 256 bytes of initialised data from .data into
 * the fresh page, reads them back with plain loads and exits 0 (all there) or 1 (not, with
 * one line "F BAD <variant> off=<byte> got=<word>"). The first store into the fresh page
 * page-faults, and on the way back from that fault Linux switches to a runnable program.
 *
 * argv[1] picks how the copy is made, to tell the suspects apart:
 *   s  SSE: all 16 chunks loaded into XMM0-15, then stored (glibc's SSE2 memcpy does this
 *      for a copy of this size), so the XMM registers are live across the fault;
 *   r  `rep movsb`, no vector registers;
 *   g  8-byte general-register loads and stores.
 * Built by bench/guest_integrity.py (mode `preempt`) with the host's gcc: static, no libc.
 */
typedef unsigned long u64;

#define SRC8(b) (0x0101010101010101ul * (b))
static volatile u64 src[32] __attribute__((aligned(16))) = {
	SRC8(0x11), SRC8(0x12), SRC8(0x13), SRC8(0x14), SRC8(0x15), SRC8(0x16), SRC8(0x17),
	SRC8(0x18), SRC8(0x19), SRC8(0x1a), SRC8(0x1b), SRC8(0x1c), SRC8(0x1d), SRC8(0x1e),
	SRC8(0x1f), SRC8(0x21), SRC8(0x22), SRC8(0x23), SRC8(0x24), SRC8(0x25), SRC8(0x26),
	SRC8(0x27), SRC8(0x28), SRC8(0x29), SRC8(0x2a), SRC8(0x2b), SRC8(0x2c), SRC8(0x2d),
	SRC8(0x2e), SRC8(0x2f), SRC8(0x31), SRC8(0x32),
};

static long sys3(long n, long a, long b, long c)
{
	long r;
	__asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return r;
}

static void copy_sse(volatile u64 *dst)
{
	__asm__ volatile(
		"movdqa 0(%0), %%xmm0\n movdqa 16(%0), %%xmm1\n movdqa 32(%0), %%xmm2\n"
		"movdqa 48(%0), %%xmm3\n movdqa 64(%0), %%xmm4\n movdqa 80(%0), %%xmm5\n"
		"movdqa 96(%0), %%xmm6\n movdqa 112(%0), %%xmm7\n movdqa 128(%0), %%xmm8\n"
		"movdqa 144(%0), %%xmm9\n movdqa 160(%0), %%xmm10\n movdqa 176(%0), %%xmm11\n"
		"movdqa 192(%0), %%xmm12\n movdqa 208(%0), %%xmm13\n movdqa 224(%0), %%xmm14\n"
		"movdqa 240(%0), %%xmm15\n"
		"movdqu %%xmm0, 0(%1)\n movdqu %%xmm1, 16(%1)\n movdqu %%xmm2, 32(%1)\n"
		"movdqu %%xmm3, 48(%1)\n movdqu %%xmm4, 64(%1)\n movdqu %%xmm5, 80(%1)\n"
		"movdqu %%xmm6, 96(%1)\n movdqu %%xmm7, 112(%1)\n movdqu %%xmm8, 128(%1)\n"
		"movdqu %%xmm9, 144(%1)\n movdqu %%xmm10, 160(%1)\n movdqu %%xmm11, 176(%1)\n"
		"movdqu %%xmm12, 192(%1)\n movdqu %%xmm13, 208(%1)\n movdqu %%xmm14, 224(%1)\n"
		"movdqu %%xmm15, 240(%1)\n"
		: : "r"(src), "r"(dst) : "memory");
}

static void copy_rep(volatile u64 *dst)
{
	u64 n = 256;
	const volatile u64 *s = src;
	__asm__ volatile("rep movsb" : "+D"(dst), "+S"(s), "+c"(n) : : "memory");
}

static void copy_gpr(volatile u64 *dst)
{
	for (int i = 0; i < 32; i++)
		dst[i] = src[i];
}

static char *hex(char *p, u64 v)
{
	for (int i = 60; i >= 0; i -= 4)
		*p++ = "0123456789abcdef"[(v >> i) & 15];
	return p;
}

int start(long *sp);
int __attribute__((used)) start(long *sp)
{
	char variant = sp[0] > 1 ? *(char *)sp[2] : 's';
	u64 cur = (u64)sys3(12, 0, 0, 0);                            /* brk(0) */
	u64 page = (cur + 4095) & ~4095ul;
	if ((u64)sys3(12, (long)(page + 8192), 0, 0) < page + 8192)
		return 2;
	volatile u64 *dst = (volatile u64 *)(page + 64);
	if (variant == 'r')
		copy_rep(dst);
	else if (variant == 'g')
		copy_gpr(dst);
	else
		copy_sse(dst);
	for (int i = 0; i < 32; i++)
		if (dst[i] != src[i]) {
			char line[80] = "F BAD x off=", *p = line + 12;
			line[6] = variant;
			p = hex(p, (u64)i * 8);
			for (const char *t = " got="; *t; t++)
				*p++ = *t;
			p = hex(p, dst[i]);
			*p++ = '\n';
			sys3(1, 1, (long)line, p - line);
			return 1;
		}
	return 0;
}

__asm__(".text\n.globl _start\n_start:\n"
	"	mov %rsp, %rdi\n and $-16, %rsp\n call start\n"
	"	mov %eax, %edi\n mov $231, %eax\n syscall\n hlt\n");
