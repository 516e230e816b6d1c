/*
 * ucheck: does guest user mode keep its registers and memory while the kernel side works?
 *
 * Issue 8 saw the default Linux guest's user space compute wrong results now and then on
 * kvm-pvm. This guest separates the host's part from vmrun's and Linux's: it runs no Linux and
 * needs no syscall fix-up. Entered from entry.S, it sets up the LAPIC timer (periodic, `hz`
 * per second, handled at CPL0 and returned from with iretq), FS/GS bases and SSE, then runs
 * at CPL3 with interrupts on, in rounds, until `secs` seconds of timer ticks have passed:
 *
 *   regs     all 15 GPRs but RSP and XMM0-15 hold known values across a spin of `spin`
 *            iterations (timer interrupts arrive in it); any change is counted
 *   ucall    the same across one ucall (ud2 -> #UD handler at CPL0 -> iretq)
 *   fpu      the same across a ucall whose handler does a context switch's fxsave64/fxrstor64
 *            of another state and back (fx: that state read back wrong at CPL0)
 *   pio      the same across a ucall whose handler reads a port (an exit to the VMM), every
 *            `pio` rounds (such a round also reads the clock)
 *   sum      FNV-1a over 64 KiB of known data equals the value computed at start
 *   fsgs     %fs:0 and %gs:0 read the markers at the FS and GS bases the kernel set
 *   shoot    2 vCPUs: a TLB shootdown (IPI, or KVM's PV TLB flush for a preempted vCPU, as
 *            Linux does) of a page cpu 1's user mode keeps reading (see shoot())
 *   fsswitch the timer IRQ switches "tasks" (a new FS base by wrmsr, as Linux's context
 *            switch does) and user mode's %fs:0 must follow (fsswitch=0: fixed bases, and
 *            the fsgs check instead)
 *   preempt  every timer tick that arrives in user mode switches between this program
 *            ("task A", all the checks above) and a second user-mode task B, as Linux
 *            switches two runnable processes: the tick's frame is saved, fxsave64 of the
 *            running task's FPU, fxrstor64 of the other's, its FS base by wrmsr, and iretq
 *            into the other task where it was preempted. B spins with its own XMM0-15
 *            values and checks them (b_xmm); A's spins check theirs (regs/xmm). This is
 *            what broke fresh Linux processes beside a busy loop (README, issue 8).
 *   roots    16 page-table roots per CPU that map one address to 16 frames; user mode
 *            switches root (CR3 write) and must see its root's frame (see roots_setup())
 *   remap    the kernel points a user page at the other of two frames (invlpg, or a CR3
 *            reload): user mode must read and write the new frame
 *   sys      the GPRs across a real `syscall` (vmrun's fix-up on kvm-pvm; sysretq back)
 *   pf       the GPRs across a user-mode #PF on a page the kernel unmapped (the fix-up's
 *            single-step path on kvm-pvm)
 *   mem      each round writes a generation number over every page of a 16 MiB region
 *            (`huge=1`: one mapped with 2 MiB guest pages, else 4 KiB); every `kcheck`
 *            ms the kernel (CPL0) reads word 0 of each page and writes word 1, and user
 *            mode reads both back: what one side wrote the other must see
 *
 * Every second it prints `ucheck: t=S rounds=N regs=.. ucall=.. sum=.. fsgs=.. mem_k=..
 * mem_u=.. irqs=..` (counts of mismatches) on the debug console, and at the end `ucheck: done
 * ...` and exits through the debug-exit port (0 if nothing was wrong, 1 otherwise). The first
 * mismatch of each kind is described on its own line. `cpus=2` also starts the second vCPU
 * (INIT/SIPI), which runs the same rounds on its own region (mem uses region + 16 MiB).
 *
 * Options (PVH command line): secs=10 hz=250 spin=200000 huge=0 kcheck=500 cpus=1 ucalls=1 pio=8
 * pvflush=1 fsswitch=1 preempt=1
 * (hz=0: no timer). The clock is vmrun's ACPI PM timer (port 0x608), read through a ucall.
 */
#define GUEST_NAME "ucheck"
#define RUNTIME_PER_CPU                 /* two vCPUs: a line buffer each, its own handlers */
#define LINE_SIZE 512
#include "runtime.h"

#define LAPIC 0xFEE00000ull
#define DATA_BASE 0x01800000ull       /* 64 KiB of known data, 4 KiB guest pages */
#define DATA_SIZE (64 * 1024)
#define REGION_SMALL 0x02000000ull    /* 2 x 16 MiB, 4 KiB guest pages (entry.S: below 64 MiB) */
#define REGION_HUGE 0x04000000ull     /* 2 x 16 MiB, 2 MiB guest pages */
#define REGION_SIZE (16 * MiB)
#define PAGES (REGION_SIZE / 4096)
#define MAXCPU 2
#define PM_TMR 0x608                  /* vmrun's ACPI PM timer: 3.579545 MHz, 32 bits */
#define PM_HZ 3579545ull
#define HIGH 0xFFFF800000000000ull    /* entry.S maps the low 4 GiB here too */
#define GS_PAGES 0x01600000ull        /* per CPU: the user GS base page, then a demand page */
#define NREMAP 64                     /* per CPU: pages the kernel points at one of two frames */
#define REMAP_VA 0x01500000ull        /* + (cpu * NREMAP + i) * 4 KiB */
#define FRAMES 0x01400000ull          /* + ((cpu * 2 + f) * NREMAP + i) * 4 KiB */
#define SHARED_VA 0x01300000ull       /* shoot: a page both CPUs map; cpu 0 flips its frame */
#define SHARED_FRAMES 0x01200000ull   /* two frames */
#define STEAL_TIME 0x01310000ull      /* per CPU (64 bytes each): KVM's steal-time record */
#define IPI_VECTOR 0xF0
#define NROOTS 16                     /* roots: per CPU, page-table roots ("processes") */
#define ROOT_TABLES 0x01A00000ull     /* + (cpu * NROOTS + r) * 16 KiB: PML4, PDPT, PD, PT */
#define ROOT_FRAMES 0x01B00000ull     /* + (cpu * NROOTS + r) * 4 KiB: what ROOT_VA shows */
#define ROOT_VA 0x01C00000ull         /* + cpu * 4 KiB: one address, a frame per root */
#define PF_FRAMES 0x01D00000ull       /* + (cpu * 2 + f) * 4 KiB: the demand page's frames */

/* -- ucalls: runtime.h's UCALL_PRINT (1) and UCALL_EXIT (2), then ucheck's own ---------- */
enum { UCALL_NOP = UCALL_FIRST_FREE, UCALL_KCHECK = 4, UCALL_PIO = 5, UCALL_PMTMR = 6,
       UCALL_FPUSWAP = 7, UCALL_UNMAP = 8, UCALL_REMAP = 9, UCALL_RCHECK = 10,
       UCALL_SHOOT = 11, UCALL_SWITCH = 12 };
/* reg_window modes that are not ucalls: a real `syscall`, and a user-mode page fault. */
enum { MODE_SYSCALL = 100, MODE_PF = 101 };

struct cpu {
	struct line out;
	int in_user;
	int id;
	u64 ticks;                 /* timer interrupts taken (cpu 0's clock the run's clock) */
	u64 irqs_user;             /* of them, arriving in user mode */
	u64 rounds, regs_bad, xmm_bad, ucall_bad, pio_bad, fpu_bad, fx_bad, sum_bad, fsgs_bad;
	u64 mem_k_bad, mem_u_bad, sys_bad, pf_bad, remap_bad;
	u64 remap_frame;           /* 0 or 1: which frame REMAP_VA maps now */
	u64 frame_token[2];        /* what user mode last wrote through REMAP_VA to each frame */
	u64 remap_pending;         /* remapped this round, checked at its end */
	u64 shoot_bad_ipi, shoot_bad_pv;   /* cpu 1: stale reads of SHARED_VA, by flush path */
	u64 shoot_reads, shoots_ipi, shoots_pv, seen_preempted;
	u64 syscalls, pfs;         /* handled at CPL0 */
	u64 pf_frame, pf_value;    /* the demand page's frame now, and what the kernel put there */
	u64 kgs[2];                /* KERNEL_GS_BASE: syscall_entry's scratch and kernel stack */
	u64 first_reported;        /* bit per kind: first mismatch already described */
	u64 region;
	u64 fs_marker[2];          /* FS base points here (fs_marker[0] is read as %fs:0) */
	u64 gs_marker[2];
	u64 task_fs[2][8];         /* fsswitch: the two "tasks'" FS areas ([t][0] is read) */
	volatile u64 task;         /* the current one; the timer IRQ switches */
	u64 fsswitch_bad, fsswitch_reads, switches;
	u64 roots_bad, root_switches, home_cr3;
	u64 kcheck_gen;            /* generation the kernel checked, and its count of misses */
	u64 kcheck_bad;
	u64 kcheck_first;          /* first page the kernel found wrong, + 1 */
	u64 kcheck_word;
	u64 preempts, pf_preempts, b_rounds, b_bad;     /* preempt: switches, task B's windows and misses */
	u64 b_first_got, b_first_want;     /* B's first wrong XMM lane (B cannot print) */
	int in_b;                          /* task B is the one running in user mode */
} __attribute__((aligned(64)));

static struct cpu cpus[MAXCPU];
static volatile int cpus_up;
static volatile int stop;
static u64 end_ticks, spin, kcheck, ucalls, hz, pio;
static volatile u64 pm_elapsed;        /* PM timer counts since the start (cpu 0 keeps it) */
static u32 pm_last;
static int ncpus;

/* Output: a line buffer per CPU (runtime.h's struct line); from user mode through a ucall. */
static void put(struct cpu *c, const char *s) { line_put(&c->out, s); }
static void putu(struct cpu *c, u64 v) { line_putu(&c->out, v); }
static void puthex(struct cpu *c, u64 v) { line_puthex(&c->out, v); }
static void flush_line(struct cpu *c) { line_flush(&c->out, c->in_user); }
static void __attribute__((noreturn)) finish(struct cpu *c, u8 code) { exit_vm(c->in_user, code); }

static u32 lapic_id(void) { return rd32(LAPIC + 0x20) >> 24; }

static struct cpu *this_cpu_kernel(void)
{
	u32 id = lapic_id();
	return &cpus[id < MAXCPU ? id : 0];
}

static void kcheck_region(struct cpu *c, u64 gen)
{
	/* At CPL0 (emulated on kvm-pvm): what user mode wrote, seen through the kernel side;
	   then a word that user mode must see. */
	u64 bad = 0, first = 0, word = 0;
	for (u64 p = 0; p < PAGES; p++) {
		volatile u64 *page = (volatile u64 *)(c->region + p * 4096);
		u64 w = page[0];
		if (w != gen) {
			if (!bad) { first = p + 1; word = w; }
			bad++;
		}
		page[1] = ~gen;
	}
	c->kcheck_gen = gen;
	c->kcheck_bad += bad;
	if (bad && !c->kcheck_first) {
		c->kcheck_first = first;
		c->kcheck_word = word;
	}
}

/* What a kernel's context switch does with the FPU (fxsave64 of this task, fxrstor64 of
   another's, and back), at CPL0: emulated on kvm-pvm. The other state must read back as
   written (fx_bad), and the user's XMM registers must survive (checked in user mode). */
static u8 fx_a[MAXCPU][512] __attribute__((aligned(16)));
static u8 fx_b[MAXCPU][512] __attribute__((aligned(16)));
static u8 fx_c[MAXCPU][512] __attribute__((aligned(16)));

static void fpu_swap(struct cpu *c)
{
	u8 *a = fx_a[c->id], *b = fx_b[c->id], *x = fx_c[c->id];
	__asm__ volatile("fxsave64 %0" : "=m"(*(u8 (*)[512])a));
	for (int i = 0; i < 512; i++)
		b[i] = a[i];
	for (int i = 160; i < 416; i++)            /* XMM0-15: another task's values */
		b[i] = (u8)(a[i] ^ 0x5A ^ i);
	__asm__ volatile("fxrstor64 %0" : : "m"(*(u8 (*)[512])b));
	__asm__ volatile("fxsave64 %0" : "=m"(*(u8 (*)[512])x));
	for (int i = 160; i < 416; i++)
		if (x[i] != b[i]) {
			c->fx_bad++;
			break;
		}
	__asm__ volatile("fxrstor64 %0" : : "m"(*(u8 (*)[512])a));
}

void __attribute__((noreturn)) fault_handler(u64 vector, u64 *stack);
static void shoot(struct cpu *c);

/* The 4 KiB PTE of a page (entry.S's identity map, walked from CR3). */
static volatile u64 *pte_of(u64 va)
{
	u64 cr3;
	__asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
	u64 *t = (u64 *)(cr3 & ~0xFFFull);
	t = (u64 *)(t[(va >> 39) & 511] & 0xFFFFFFFFF000ull);
	t = (u64 *)(t[(va >> 30) & 511] & 0xFFFFFFFFF000ull);
	t = (u64 *)(t[(va >> 21) & 511] & 0xFFFFFFFFF000ull);
	return &t[(va >> 12) & 511];
}

static volatile u64 *demand_pte_ptr(struct cpu *c)
{
	return pte_of(GS_PAGES + (u64)c->id * 0x2000 + 0x1000);
}

/*
 * roots: what a kernel's process switch does to the MMU. Each CPU gets NROOTS page-table
 * roots, copies of entry.S's tables except for the 2 MiB around ROOT_VA, where root r maps
 * ROOT_VA to its own frame (holding the token r's). User mode switches root by a ucall (a CR3
 * write, no PCID, so a full flush as for Linux here) and must read its root's token: more roots
 * than a host keeps address-space tags for, in a changing order.
 */
static void roots_setup(struct cpu *c)
{
	u64 cr3;
	__asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
	c->home_cr3 = cr3;
	u64 *pml4 = (u64 *)(cr3 & ~0xFFFull);
	u64 *pdpt = (u64 *)(pml4[0] & 0xFFFFFFFFF000ull);
	u64 *pd = (u64 *)(pdpt[0] & 0xFFFFFFFFF000ull);
	u64 *pt = (u64 *)(pd[(ROOT_VA >> 21) & 511] & 0xFFFFFFFFF000ull);
	for (u64 r = 0; r < NROOTS; r++) {
		u64 t = ROOT_TABLES + ((u64)c->id * NROOTS + r) * 0x4000;
		u64 *n4 = (u64 *)t, *n3 = (u64 *)(t + 0x1000), *n2 = (u64 *)(t + 0x2000);
		u64 *n1 = (u64 *)(t + 0x3000);
		for (int i = 0; i < 512; i++) {
			n4[i] = pml4[i];
			n3[i] = pdpt[i];
			n2[i] = pd[i];
			n1[i] = pt[i];
		}
		u64 frame = ROOT_FRAMES + ((u64)c->id * NROOTS + r) * 0x1000;
		*(volatile u64 *)frame = 0x700700000000ull | (u64)c->id << 16 | r;
		n1[((ROOT_VA >> 12) & 511) + (u64)c->id] = frame | 0x7;
		n2[(ROOT_VA >> 21) & 511] = (u64)(uintptr_t)n1 | 0x7;
		n3[0] = (u64)(uintptr_t)n2 | 0x7;
		n4[0] = (u64)(uintptr_t)n3 | 0x7;
	}
}

static void root_switch(struct cpu *c, u64 r)
{
	u64 cr3 = r < NROOTS ? ROOT_TABLES + ((u64)c->id * NROOTS + r) * 0x4000 : c->home_cr3;
	__asm__ volatile("mov %0, %%cr3" : : "r"(cr3) : "memory");
	c->root_switches++;
}

/* What a kernel does to a process's page (COW, reclaim, migration): point the virtual page
   at another frame, then flush it (mode 0: invlpg; 1: reload CR3, as a context switch). */
static u64 remap_va(struct cpu *c, u64 i) { return REMAP_VA + ((u64)c->id * NREMAP + i) * 4096; }
static u64 frame_pa(struct cpu *c, u64 f, u64 i)
{
	return FRAMES + (((u64)c->id * 2 + f) * NREMAP + i) * 4096;
}

static void remap(struct cpu *c, u64 mode)
{
	c->remap_frame ^= 1;
	for (u64 i = 0; i < NREMAP; i++) {
		u64 va = remap_va(c, i);
		*pte_of(va) = frame_pa(c, c->remap_frame, i) | 0x7;
		if (mode == 0)
			__asm__ volatile("invlpg (%0)" : : "r"(va) : "memory");
	}
	if (mode != 0) {
		u64 cr3;
		__asm__ volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3) : : "memory");
	}
}

/* At CPL0, through the frames' own (identity) addresses: each holds what user mode last
   wrote to it through REMAP_VA. */
static void remap_check(struct cpu *c)
{
	for (u64 f = 0; f < 2; f++)
		for (u64 i = 0; i < NREMAP && c->frame_token[f]; i++) {   /* 0: not written yet */
			u64 w = *(volatile u64 *)frame_pa(c, f, i);
			if (w != (c->frame_token[f] | i)) {
				c->remap_bad++;
				if (!c->kcheck_first) {
					c->kcheck_first = 0x1000000 + f;
					c->kcheck_word = w;
				}
			}
		}
}

static void demand_pte(struct cpu *c, int present)
{
	volatile u64 *pte = demand_pte_ptr(c);
	u64 va = GS_PAGES + (u64)c->id * 0x2000 + 0x1000;
	*pte = present ? *pte | 1 : *pte & ~1ull;
	__asm__ volatile("invlpg (%0)" : : "r"(va) : "memory");
}

static u64 preempt;
static void preempt_switch(struct cpu *c, struct frame *f);

/* preempt from the #PF's return, as Linux schedules on its way back to user mode after a
   fault: pf_entry's frame has the error code between the GPRs and the iretq frame. */
static void preempt_from_pf(struct cpu *c, struct frame *f)
{
	u64 *raw = (u64 *)f;
	struct frame t;
	u64 *tr = (u64 *)&t;
	for (int i = 0; i < 15; i++)
		tr[i] = raw[i];
	for (int i = 0; i < 5; i++)
		tr[15 + i] = raw[16 + i];
	preempt_switch(c, &t);
	for (int i = 0; i < 15; i++)
		raw[i] = tr[i];
	for (int i = 0; i < 5; i++)
		raw[16 + i] = tr[15 + i];
	c->pf_preempts++;
}

/* #PF (from pf_entry): the demand page is mapped back; anything else is a real fault. */
void pf_handler(struct frame *f)
{
	struct cpu *c = this_cpu_kernel();
	u64 cr2;
	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	if ((cr2 & ~0xFFFull) == GS_PAGES + (u64)c->id * 0x2000 + 0x1000) {
		/* A fresh frame each time, filled here before it is mapped, as Linux maps a new
		   zeroed page: the faulting write must land in it (seen lost in Linux guests). */
		volatile u64 *pte = demand_pte_ptr(c);
		u64 frame = PF_FRAMES + ((u64)c->id * 2 + (c->pfs & 1)) * 0x1000;
		c->pfs++;
		c->pf_value = 0x5046000000000000ull + c->pfs;
		*(volatile u64 *)(uintptr_t)frame = c->pf_value;
		*pte = (*pte & (0xFFFull | (1ull << 63))) | frame | 1;
		__asm__ volatile("invlpg (%0)" : : "r"(cr2 & ~0xFFFull) : "memory");
		c->pf_frame = frame;
		if (preempt && !stop && !c->in_b)
			preempt_from_pf(c, f);
		return;
	}
	fault_handler(14, &f->rip + 1);               /* past the error code */
}

/* SYSCALL (from syscall_entry, at CPL0 on its kernel stack): counted; with fsswitch it also
   switches "tasks" (a blocking system call's context switch), so the FS base the fix-up's
   KVM_SET_SREGS saw at entry is not the one user mode must get back. */
static u64 fsswitch;

void syscall_handler(void)
{
	struct cpu *c = this_cpu_kernel();
	c->syscalls++;
	if (fsswitch) {
		u64 t = c->task ^ 1;
		wrmsr(0xC0000100, (u64)(uintptr_t)c->task_fs[t]);
		c->task = t;
		c->switches++;
	}
}

void ucall_handler(struct frame *f)
{
	struct cpu *c = this_cpu_kernel();
	if (f->rdi == UCALL_PRINT)
		console_write((const char *)(uintptr_t)f->rsi);
	else if (f->rdi == UCALL_EXIT) {
		stop = 1;
		outb(DEBUG_EXIT, (u8)f->rsi);
	} else if (f->rdi == UCALL_NOP)
		;
	else if (f->rdi == UCALL_KCHECK)
		kcheck_region(c, f->rsi);
	else if (f->rdi == UCALL_PIO)
		(void)inl(PM_TMR);                     /* an exit to the VMM inside the handler */
	else if (f->rdi == UCALL_PMTMR)
		f->rax = inl(PM_TMR);
	else if (f->rdi == UCALL_FPUSWAP)
		fpu_swap(c);
	else if (f->rdi == UCALL_UNMAP)
		demand_pte(c, 0);
	else if (f->rdi == UCALL_REMAP)
		remap(c, f->rsi);
	else if (f->rdi == UCALL_RCHECK)
		remap_check(c);
	else if (f->rdi == UCALL_SHOOT)
		shoot(c);
	else if (f->rdi == UCALL_SWITCH)
		root_switch(c, f->rsi);
	else {
		console_write("ucheck: unexpected #UD\n");
		outb(DEBUG_EXIT, 1);
	}
	f->rip += 2;
}

/*
 * shoot (2 vCPUs): what a kernel's TLB shootdown does. Cpu 0 points SHARED_VA at the other
 * frame (which holds the new generation number), flushes locally, and has cpu 1 flush: with
 * an IPI, or, when KVM's steal-time record says cpu 1 is preempted and the host offers
 * KVM_FEATURE_PV_TLB_FLUSH, by setting KVM_VCPU_FLUSH_TLB there as Linux does (the host must
 * flush before cpu 1 runs again). Then it publishes the generation; cpu 1's user mode reads
 * SHARED_VA all the time and must never see an older one than published.
 */
static volatile u64 shoot_gen, shoot_done, ipi_ack;
static volatile u8 shoot_path[1024];         /* 1: IPI, 2: PV flush, by generation */
static int pv_tlb_flush;

static void shoot(struct cpu *c)
{
	u64 gen = shoot_gen + 1, f = gen & 1;
	*(volatile u64 *)(SHARED_FRAMES + f * 4096) = gen;
	*pte_of(SHARED_VA) = (SHARED_FRAMES + f * 4096) | 0x7;
	__asm__ volatile("invlpg (%0)" : : "r"(SHARED_VA) : "memory");
	shoot_gen = gen;
	volatile u8 *preempted = (volatile u8 *)(STEAL_TIME + 64 + 16);
	u8 st = *preempted;
	if (st & 1)
		c->seen_preempted++;
	if (pv_tlb_flush && (st & 1) &&
	    __atomic_compare_exchange_n(preempted, &st, (u8)(st | 2), 0, __ATOMIC_SEQ_CST,
					__ATOMIC_SEQ_CST)) {
		shoot_path[gen & 1023] = 2;
		c->shoots_pv++;
	} else {
		shoot_path[gen & 1023] = 1;
		c->shoots_ipi++;
		wr32(LAPIC + 0x310, 1u << 24);
		wr32(LAPIC + 0x300, IPI_VECTOR);          /* fixed, to APIC 1 */
		for (u64 d = 0; ipi_ack != gen && d < 20000000; d++)
			cpu_relax();
	}
	shoot_done = gen;
}

/*
 * preempt: two user-mode tasks on one CPU, switched by the timer tick as Linux switches
 * two runnable processes (the frame of the preempted one kept, its FPU saved with
 * fxsave64 and the other's restored with fxrstor64, FS base by wrmsr). B's XMM0-15 start
 * from an fxrstor64 of a saved image whose XMM area is zero, as a fresh process's do.
 */
static u8 pfx[MAXCPU][2][512] __attribute__((aligned(16)));
static struct frame task_frame[MAXCPU][2];
static u8 b_stack[MAXCPU][16384] __attribute__((aligned(16)));
static u64 b_fs[MAXCPU][8];
static void __attribute__((noreturn)) b_task(struct cpu *c);

static void preempt_setup(struct cpu *c)
{
	u8 *b = pfx[c->id][1];
	__asm__ volatile("fxsave64 %0" : "=m"(*(u8 (*)[512])b));
	for (int i = 160; i < 416; i++)
		b[i] = 0;
	struct frame *f = &task_frame[c->id][1];
	f->rip = (u64)(uintptr_t)b_task;
	f->cs = 0x1b;
	f->rflags = 0x202;
	f->rsp = (u64)(uintptr_t)(b_stack[c->id] + sizeof(b_stack[c->id])) - 8;
	f->ss = 0x23;
	f->rdi = (u64)(uintptr_t)c;
	b_fs[c->id][0] = 0xb0b0000000000000ull | (u64)c->id;
}

static void preempt_switch(struct cpu *c, struct frame *f)
{
	/* (also from pf_handler: the #PF of the demand page, in task A) */
	int from = c->in_b, to = !from;
	u8 *save = pfx[c->id][from], *load = pfx[c->id][to];
	task_frame[c->id][from] = *f;
	__asm__ volatile("fxsave64 %0" : "=m"(*(u8 (*)[512])save));
	__asm__ volatile("fxrstor64 %0" : : "m"(*(u8 (*)[512])load));
	wrmsr(0xC0000100, to ? (u64)(uintptr_t)b_fs[c->id]
		: fsswitch ? (u64)(uintptr_t)c->task_fs[c->task] : (u64)(uintptr_t)c->fs_marker);
	*f = task_frame[c->id][to];
	c->in_b = to;
	c->preempts++;
}

void irq_handler(u64 vector, struct frame *f)
{
	struct cpu *c = this_cpu_kernel();
	if (vector == 0x20 && (f->cs & 3) == 3 && fsswitch && !c->in_b) {
		/* a scheduler tick that switches tasks: the next task's FS base, as Linux's
		   __switch_to writes it (wrmsr; fsgsbase is off in the guest), then iretq */
		u64 t = c->task ^ 1;
		wrmsr(0xC0000100, (u64)(uintptr_t)c->task_fs[t]);
		c->task = t;
		c->switches++;
	}
	if (vector == IPI_VECTOR) {
		u64 gen = shoot_gen;
		__asm__ volatile("invlpg (%0)" : : "r"(SHARED_VA) : "memory");
		ipi_ack = gen;
	}
	if (vector == 0x20) {
		c->ticks++;
		if ((f->cs & 3) == 3)
			c->irqs_user++;
		if ((f->cs & 3) == 3 && preempt && !stop)
			preempt_switch(c, f);
	}
	if (vector != 0xFF)
		wr32(LAPIC + 0xB0, 0);                 /* EOI */
}

void __attribute__((noreturn)) fault_handler(u64 vector, u64 *stack)
{
	struct cpu *c = this_cpu_kernel();
	c->in_user = 0;
	c->out.len = 0;
	put(c, "ucheck: cpu");
	putu(c, (u64)c->id);
	put(c, " exception ");
	putu(c, vector);
	put(c, " at ");
	puthex(c, stack[0]);
	put(c, " ");
	puthex(c, stack[1]);
	put(c, " ");
	puthex(c, stack[2]);
	flush_line(c);
	finish(c, 1);
}

/* -- the checks, in user mode ----------------------------------------------------------- */
#define NREGS 15
static const u64 reg_pattern[NREGS] = {
	0x0101010101010101ull, 0x1212121212121212ull, 0x2323232323232323ull, 0x3434343434343434ull,
	0x4545454545454545ull, 0x5656565656565656ull, 0x6767676767676767ull, 0x7878787878787878ull,
	0x8989898989898989ull, 0x9a9a9a9a9a9a9a9aull, 0xababababababababull, 0xbcbcbcbcbcbcbcbcull,
	0xcdcdcdcdcdcdcdcdull, 0xdedededededededeull, 0xefefefefefefefefull,
};
static const char *const reg_name[NREGS] = {
	"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
	"r14", "r15",
};
static const u64 xmm_pattern[32] __attribute__((aligned(16))) = {
	0xa0a0a0a0a0a0a0a1ull, 0xb0b0b0b0b0b0b0b1ull, 0xa1a1a1a1a1a1a1a2ull, 0xb1b1b1b1b1b1b1b2ull,
	0xa2a2a2a2a2a2a2a3ull, 0xb2b2b2b2b2b2b2b3ull, 0xa3a3a3a3a3a3a3a4ull, 0xb3b3b3b3b3b3b3b4ull,
	0xa4a4a4a4a4a4a4a5ull, 0xb4b4b4b4b4b4b4b5ull, 0xa5a5a5a5a5a5a5a6ull, 0xb5b5b5b5b5b5b5b6ull,
	0xa6a6a6a6a6a6a6a7ull, 0xb6b6b6b6b6b6b6b7ull, 0xa7a7a7a7a7a7a7a8ull, 0xb7b7b7b7b7b7b7b8ull,
	0xa8a8a8a8a8a8a8a9ull, 0xb8b8b8b8b8b8b8b9ull, 0xa9a9a9a9a9a9a9aaull, 0xb9b9b9b9b9b9b9baull,
	0xaaaaaaaaaaaaaaabull, 0xbabababababababbull, 0xabababababababacull, 0xbbbbbbbbbbbbbbbcull,
	0xacacacacacacacadull, 0xbcbcbcbcbcbcbcbdull, 0xadadadadadadadaeull, 0xbdbdbdbdbdbdbdbeull,
	0xaeaeaeaeaeaeaeafull, 0xbebebebebebebebfull, 0xafafafafafafafb0ull, 0xbfbfbfbfbfbfbfc0ull,
};

/*
 * reg_window(iters, out, xmm_out, mode): every GPR but RSP and XMM0-15 get known values;
 * then `iters` times (counter in memory) each GPR gets +1 and XMM0-14 += XMM15, so that a
 * state restored from an older snapshot shows too, not only one zeroed or swapped; then a
 * mode other than 0 does its op once (a ucall: ud2 with the op in RDI, whose value is put back
 * from memory; a syscall; a page fault);
 * then all of them are stored to out[0..14] and xmm_out[0..31].
 */
extern void reg_window(u64 iters, u64 *out, u64 *xmm_out, u64 mode);
__asm__(
	".text\n"
	".globl reg_window\n"
	"reg_window:\n"
	"	push %rbx\n push %rbp\n push %r12\n push %r13\n push %r14\n push %r15\n"
	"	push %rdx\n"                          /* 24(%rsp): xmm_out */
	"	push %rsi\n"                          /* 16(%rsp): out */
	"	push %rcx\n"                          /*  8(%rsp): mode */
	"	push %rdi\n"                          /*  0(%rsp): counter */
	"	lea xmm_pattern(%rip), %rax\n"
	"	movdqa 0(%rax), %xmm0\n movdqa 16(%rax), %xmm1\n movdqa 32(%rax), %xmm2\n"
	"	movdqa 48(%rax), %xmm3\n movdqa 64(%rax), %xmm4\n movdqa 80(%rax), %xmm5\n"
	"	movdqa 96(%rax), %xmm6\n movdqa 112(%rax), %xmm7\n movdqa 128(%rax), %xmm8\n"
	"	movdqa 144(%rax), %xmm9\n movdqa 160(%rax), %xmm10\n movdqa 176(%rax), %xmm11\n"
	"	movdqa 192(%rax), %xmm12\n movdqa 208(%rax), %xmm13\n movdqa 224(%rax), %xmm14\n"
	"	movdqa 240(%rax), %xmm15\n"
	"	movabs $0x0101010101010101, %rax\n movabs $0x1212121212121212, %rbx\n"
	"	movabs $0x2323232323232323, %rcx\n movabs $0x3434343434343434, %rdx\n"
	"	movabs $0x4545454545454545, %rsi\n movabs $0x5656565656565656, %rdi\n"
	"	movabs $0x6767676767676767, %rbp\n movabs $0x7878787878787878, %r8\n"
	"	movabs $0x8989898989898989, %r9\n movabs $0x9a9a9a9a9a9a9a9a, %r10\n"
	"	movabs $0xabababababababab, %r11\n movabs $0xbcbcbcbcbcbcbcbc, %r12\n"
	"	movabs $0xcdcdcdcdcdcdcdcd, %r13\n movabs $0xdededededededede, %r14\n"
	"	movabs $0xefefefefefefefef, %r15\n"
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
	"	cmpq $100, 8(%rsp)\n"
	"	jne 4f\n"
	"	syscall\n"                          /* MODE_SYSCALL (RCX, R11: not compared) */
	"	jmp 3f\n"
	"4:	cmpq $101, 8(%rsp)\n"
	"	jne 2f\n"
	"	incq %gs:0x1000\n"                  /* MODE_PF: the demand page, unmapped */
	"	jmp 3f\n"
	"2:	mov %rdi, (%rsp)\n"                 /* a ucall: op = mode in rdi, its value kept */
	"	mov 8(%rsp), %rdi\n"
	"	ud2\n"
	"	mov (%rsp), %rdi\n"
	"3:	xchg %rax, 16(%rsp)\n"              /* rax = out; the loaded rax on the stack */
	"	mov %rbx, 8(%rax)\n mov %rcx, 16(%rax)\n mov %rdx, 24(%rax)\n"
	"	mov %rsi, 32(%rax)\n mov %rdi, 40(%rax)\n mov %rbp, 48(%rax)\n mov %r8, 56(%rax)\n"
	"	mov %r9, 64(%rax)\n mov %r10, 72(%rax)\n mov %r11, 80(%rax)\n mov %r12, 88(%rax)\n"
	"	mov %r13, 96(%rax)\n mov %r14, 104(%rax)\n mov %r15, 112(%rax)\n"
	"	mov 16(%rsp), %rbx\n mov %rbx, 0(%rax)\n"
	"	mov 24(%rsp), %rax\n"
	"	movdqu %xmm0, 0(%rax)\n movdqu %xmm1, 16(%rax)\n movdqu %xmm2, 32(%rax)\n"
	"	movdqu %xmm3, 48(%rax)\n movdqu %xmm4, 64(%rax)\n movdqu %xmm5, 80(%rax)\n"
	"	movdqu %xmm6, 96(%rax)\n movdqu %xmm7, 112(%rax)\n movdqu %xmm8, 128(%rax)\n"
	"	movdqu %xmm9, 144(%rax)\n movdqu %xmm10, 160(%rax)\n movdqu %xmm11, 176(%rax)\n"
	"	movdqu %xmm12, 192(%rax)\n movdqu %xmm13, 208(%rax)\n movdqu %xmm14, 224(%rax)\n"
	"	movdqu %xmm15, 240(%rax)\n"
	"	add $32, %rsp\n"
	"	pop %r15\n pop %r14\n pop %r13\n pop %r12\n pop %rbp\n pop %rbx\n"
	"	ret\n");

/*
 * syscall_entry: LSTAR, in the upper half like a kernel's, so that vmrun's syscall fix-up
 * (on kvm-pvm a SYSCALL stays at CPL3 and faults on this supervisor page; vmrun finishes it)
 * applies as it does to Linux. Like Linux: swapgs, user RSP to %gs:0, kernel stack from
 * %gs:8, every register saved, then back with sysretq (RCX, R11: the user's RIP and RFLAGS).
 * pf_entry: #PF with its error code, for the demand page.
 */
extern void syscall_entry(void), pf_entry(void);
__asm__(
	".text\n"
	".globl syscall_entry, pf_entry\n"
	"syscall_entry:\n"
	"	swapgs\n"
	"	mov %rsp, %gs:0\n"
	"	mov %gs:8, %rsp\n"
	"	pushq %gs:0\n"
	"	push %rcx\n push %r11\n"
	"	push %rax\n push %rbx\n push %rdx\n push %rsi\n push %rdi\n push %rbp\n"
	"	push %r8\n push %r9\n push %r10\n push %r12\n push %r13\n push %r14\n push %r15\n"
	"	call syscall_handler\n"
	"	pop %r15\n pop %r14\n pop %r13\n pop %r12\n pop %r10\n pop %r9\n pop %r8\n"
	"	pop %rbp\n pop %rdi\n pop %rsi\n pop %rdx\n pop %rbx\n pop %rax\n"
	"	pop %r11\n pop %rcx\n"
	"	pop %rsp\n"
	"	swapgs\n"
	"	sysretq\n"
	"pf_entry:\n"
	"	push %rax\n push %rbx\n push %rcx\n push %rdx\n push %rsi\n push %rdi\n push %rbp\n"
	"	push %r8\n push %r9\n push %r10\n push %r11\n push %r12\n push %r13\n push %r14\n"
	"	push %r15\n"
	"	mov %rsp, %rdi\n"
	"	sub $8, %rsp\n"
	"	call pf_handler\n"
	"	add $8, %rsp\n"
	"	pop %r15\n pop %r14\n pop %r13\n pop %r12\n pop %r11\n pop %r10\n pop %r9\n"
	"	pop %r8\n pop %rbp\n pop %rdi\n pop %rsi\n pop %rdx\n pop %rcx\n pop %rbx\n"
	"	pop %rax\n"
	"	add $8, %rsp\n"
	"	iretq\n");

enum { K_REGS, K_XMM, K_UCALL, K_PIO, K_FPU, K_SUM, K_FSGS, K_MEMK, K_MEMU, K_SYS, K_PF,
       K_REMAP, K_SHOOT, K_FSSWITCH, K_ROOTS };
static const char *const kind_name[] = {"regs", "xmm", "ucall", "pio", "fpu", "sum", "fsgs",
					"mem_k", "mem_u", "sys", "pf", "remap", "shoot",
					"fsswitch", "roots"};

static int first(struct cpu *c, int kind)
{
	if (c->first_reported & (1ull << kind))
		return 0;
	c->first_reported |= 1ull << kind;
	put(c, "ucheck: cpu");
	putu(c, (u64)c->id);
	put(c, " first ");
	put(c, kind_name[kind]);
	put(c, " mismatch (round ");
	putu(c, c->rounds);
	put(c, "): ");
	return 1;
}

static void check_regs(struct cpu *c, u64 mode)
{
	u64 out[NREGS], xmm[32];
	/* mode: 0 spin, else a ucall op */
	int kind = mode == 0 ? K_REGS : mode == UCALL_PIO ? K_PIO : mode == UCALL_FPUSWAP ? K_FPU
		: mode == MODE_SYSCALL ? K_SYS : mode == MODE_PF ? K_PF : K_UCALL;
	/* a different count every call, so that no two windows end with the same values */
	static u64 calls[MAXCPU];
	u64 k = ++calls[c->id] % 1024, n = mode ? 1 + k : spin + k, xwant[32];
	for (int i = 0; i < 32; i++)
		xwant[i] = xmm_pattern[i] + (i < 30 ? n * xmm_pattern[30 + (i & 1)] : 0);
	reg_window(n, out, xmm, mode);
	int bad = 0, xbad = 0;
	for (int i = 0; i < NREGS; i++) {
		u64 want = reg_pattern[i] + n;
		if (kind == K_SYS && (i == 2 || i == 10))
			continue;                         /* RCX, R11: SYSCALL's own */
		if (out[i] != want) {
			if (!bad && first(c, kind)) {
				for (int j = 0; j < NREGS; j++)
					if (out[j] != reg_pattern[j] + n &&
					    !(kind == K_SYS && (j == 2 || j == 10))) {
						put(c, reg_name[j]);
						put(c, "=");
						puthex(c, out[j]);
						put(c, " ");
					}
				flush_line(c);
			}
			bad = 1;
		}
	}
	for (int i = 0; i < 32; i++)
		if (xmm[i] != xwant[i]) {
			if (!xbad && first(c, kind == K_FPU ? K_FPU : K_XMM)) {
				put(c, "xmm");
				putu(c, (u64)i / 2);
				put(c, i & 1 ? ".hi=" : ".lo=");
				puthex(c, xmm[i]);
				flush_line(c);
			}
			xbad = 1;
		}
	if (bad || xbad) {
		u64 *n = kind == K_REGS ? &c->regs_bad : kind == K_PIO ? &c->pio_bad :
			kind == K_FPU ? &c->fpu_bad : kind == K_SYS ? &c->sys_bad :
			kind == K_PF ? &c->pf_bad : &c->ucall_bad;
		*n += 1;
	}
	if (xbad && kind != K_FPU)
		c->xmm_bad++;
}

/*
 * Task B (preempt): b_window(iters, in, out) loads XMM0-15 from in[0..31], adds XMM15 to
 * XMM0-14 `iters` times and stores them to out[0..31]: the tick preempts it in that loop.
 */
extern void b_window(u64 iters, const u64 *in, u64 *out);
__asm__(
	".text\n"
	".globl b_window\n"
	"b_window:\n"
	"	movdqu 0(%rsi), %xmm0\n movdqu 16(%rsi), %xmm1\n movdqu 32(%rsi), %xmm2\n"
	"	movdqu 48(%rsi), %xmm3\n movdqu 64(%rsi), %xmm4\n movdqu 80(%rsi), %xmm5\n"
	"	movdqu 96(%rsi), %xmm6\n movdqu 112(%rsi), %xmm7\n movdqu 128(%rsi), %xmm8\n"
	"	movdqu 144(%rsi), %xmm9\n movdqu 160(%rsi), %xmm10\n movdqu 176(%rsi), %xmm11\n"
	"	movdqu 192(%rsi), %xmm12\n movdqu 208(%rsi), %xmm13\n movdqu 224(%rsi), %xmm14\n"
	"	movdqu 240(%rsi), %xmm15\n"
	"1:	paddq %xmm15, %xmm0\n paddq %xmm15, %xmm1\n paddq %xmm15, %xmm2\n"
	"	paddq %xmm15, %xmm3\n paddq %xmm15, %xmm4\n paddq %xmm15, %xmm5\n"
	"	paddq %xmm15, %xmm6\n paddq %xmm15, %xmm7\n paddq %xmm15, %xmm8\n"
	"	paddq %xmm15, %xmm9\n paddq %xmm15, %xmm10\n paddq %xmm15, %xmm11\n"
	"	paddq %xmm15, %xmm12\n paddq %xmm15, %xmm13\n paddq %xmm15, %xmm14\n"
	"	dec %rdi\n"
	"	jnz 1b\n"
	"	movdqu %xmm0, 0(%rdx)\n movdqu %xmm1, 16(%rdx)\n movdqu %xmm2, 32(%rdx)\n"
	"	movdqu %xmm3, 48(%rdx)\n movdqu %xmm4, 64(%rdx)\n movdqu %xmm5, 80(%rdx)\n"
	"	movdqu %xmm6, 96(%rdx)\n movdqu %xmm7, 112(%rdx)\n movdqu %xmm8, 128(%rdx)\n"
	"	movdqu %xmm9, 144(%rdx)\n movdqu %xmm10, 160(%rdx)\n movdqu %xmm11, 176(%rdx)\n"
	"	movdqu %xmm12, 192(%rdx)\n movdqu %xmm13, 208(%rdx)\n movdqu %xmm14, 224(%rdx)\n"
	"	movdqu %xmm15, 240(%rdx)\n"
	"	ret\n");

/* Task B's loop, in user mode (entered by the first preempting tick, never returns): the
   values differ in every window, and B cannot print (A's line may be half written), so it
   counts and keeps its first wrong lane for A's report. */
static void __attribute__((noreturn)) b_task(struct cpu *c)
{
	u64 in[32], out[32];
	for (;;) {
		u64 n = ++c->b_rounds, iters = spin / 4 + (n % 1024);
		for (int i = 0; i < 30; i++)
			in[i] = 0xb1b2b3b4b5b6b7b8ull ^ ((u64)i * 0x0101010101010101ull) ^ (n << 20);
		in[30] = 1 + n % 7;
		in[31] = 3 + n % 5;
		b_window(iters, in, out);
		for (int i = 0; i < 32; i++) {
			u64 want = in[i] + (i < 30 ? iters * in[30 + (i & 1)] : 0);
			if (out[i] != want) {
				if (!c->b_bad) {
					c->b_first_got = out[i];
					c->b_first_want = want;
				}
				c->b_bad++;
				break;
			}
		}
	}
}

/* The `incq %gs:0x1000` that page-faulted: redone after the kernel mapped the fresh frame,
   it must have turned the kernel's value into value + 1, in that frame. */
static void check_pf_write(struct cpu *c)
{
	u64 got = *(volatile u64 *)(uintptr_t)(GS_PAGES + (u64)c->id * 0x2000 + 0x1000);
	if (got != c->pf_value + 1) {
		if (first(c, K_PF)) {
			put(c, "pf write lost: demand page holds ");
			puthex(c, got);
			put(c, ", want ");
			puthex(c, c->pf_value + 1);
			flush_line(c);
		}
		c->pf_bad++;
	}
}

static u64 fnv(const volatile u8 *p, u64 n)
{
	u64 h = 0xcbf29ce484222325ull;
	for (u64 i = 0; i < n; i++)
		h = (h ^ p[i]) * 0x100000001b3ull;
	return h;
}

static u64 sum_expect;

static void check_sum(struct cpu *c)
{
	u64 h = fnv((const volatile u8 *)DATA_BASE, DATA_SIZE);
	if (h != sum_expect) {
		if (first(c, K_SUM)) {
			puthex(c, h);
			put(c, " want ");
			puthex(c, sum_expect);
			flush_line(c);
		}
		c->sum_bad++;
	}
}

static void check_fsgs(struct cpu *c)
{
	u64 f, g;
	__asm__ volatile("mov %%fs:0, %0" : "=r"(f));
	__asm__ volatile("mov %%gs:0, %0" : "=r"(g));
	if (f != c->fs_marker[0] || g != c->gs_marker[0]) {
		if (first(c, K_FSGS)) {
			put(c, "%fs:0=");
			puthex(c, f);
			put(c, " %gs:0=");
			puthex(c, g);
			flush_line(c);
		}
		c->fsgs_bad++;
	}
}

/* User mode writes gen over every page (word 0, and a pattern in the rest of the first
   cache line); every kcheck ms the kernel checks word 0 and writes ~gen to word 1. */
static void check_mem(struct cpu *c, u64 gen, int kc)
{
	u64 bad = 0;
	for (u64 p = 0; p < PAGES; p++) {
		volatile u64 *page = (volatile u64 *)(c->region + p * 4096);
		u64 w = page[0], x = page[2];
		if (gen > 1 && (w != gen - 1 || x != ((gen - 1) ^ p))) {
			if (!bad && first(c, K_MEMU)) {
				put(c, "page ");
				putu(c, p);
				put(c, " word0=");
				puthex(c, w);
				put(c, " word2=");
				puthex(c, x);
				put(c, " want ");
				puthex(c, gen - 1);
				flush_line(c);
			}
			bad++;
		}
		page[0] = gen;
		page[2] = gen ^ p;
	}
	if (kc) {
		u64 before = c->kcheck_bad;
		ucall(UCALL_KCHECK, gen);
		if (c->kcheck_bad != before && first(c, K_MEMK)) {
			put(c, "kernel saw page ");
			putu(c, c->kcheck_first - 1);
			put(c, " word0=");
			puthex(c, c->kcheck_word);
			put(c, " want ");
			puthex(c, gen);
			flush_line(c);
		}
		c->mem_k_bad += c->kcheck_bad - before;
		for (u64 p = 0; p < PAGES; p++) {
			volatile u64 *page = (volatile u64 *)(c->region + p * 4096);
			if (page[1] != ~gen) {
				if (first(c, K_MEMU)) {
					put(c, "page ");
					putu(c, p);
					put(c, " word1=");
					puthex(c, page[1]);
					put(c, " want ");
					puthex(c, ~gen);
					put(c, " (written by the kernel)");
					flush_line(c);
				}
				bad++;
			}
		}
	}
	c->mem_u_bad += bad;
}

/* User side of the remap check: REMAP_VA must show the frame the kernel put there (the
   token written to that frame two rounds ago), and a write must land in that frame. */
static void remap_start(struct cpu *c)
{
	ucall(UCALL_REMAP, c->rounds & 1);
	c->remap_pending = 1;
}

/* At the end of the round (after spins, ucalls, VMM exits: time for the host to move the
   vCPU thread to another CPU), so a stale translation anywhere would be used. */
static void check_remap(struct cpu *c)
{
	if (!c->remap_pending)
		return;
	c->remap_pending = 0;
	u64 before = c->remap_bad, f = c->remap_frame, token = (u64)c->id << 56 | c->rounds << 8;
	for (u64 i = 0; i < NREMAP; i++) {
		volatile u64 *p = (volatile u64 *)remap_va(c, i);
		u64 w = p[0];
		if (w != (c->frame_token[f] | i) && (c->frame_token[f] || w)) {
			if (first(c, K_REMAP)) {
				put(c, "user mode read ");
				puthex(c, w);
				put(c, " want ");
				puthex(c, c->frame_token[f] | i);
				put(c, c->rounds & 1 ? " (after a CR3 reload)" : " (after invlpg)");
				flush_line(c);
			}
			c->remap_bad++;
		}
		p[0] = token | i;
	}
	c->frame_token[f] = token;
	ucall(UCALL_RCHECK, 0);
	if (c->remap_bad != before && first(c, K_REMAP)) {
		put(c, "remap: kernel saw frame ");
		putu(c, c->kcheck_first & 1);
		put(c, " hold ");
		puthex(c, c->kcheck_word);
		flush_line(c);
	}
}

/* Cpu 1, user mode: SHARED_VA never shows a generation older than the one published. */
static void check_shared(struct cpu *c)
{
	for (int i = 0; i < 2000; i++) {
		u64 done = shoot_done;
		__asm__ volatile("" : : : "memory");
		u64 v = *(volatile u64 *)SHARED_VA;
		c->shoot_reads++;
		if (done && v < done) {
			int pv = shoot_path[done & 1023] == 2;
			if (first(c, K_SHOOT)) {
				put(c, "read generation ");
				putu(c, v);
				put(c, " after ");
				putu(c, done);
				put(c, pv ? " was flushed (PV TLB flush)" : " was flushed (IPI)");
				flush_line(c);
			}
			*(pv ? &c->shoot_bad_pv : &c->shoot_bad_ipi) += 1;
			return;
		}
	}
}

/* User mode: %fs:0 reads the current task's marker while the timer IRQ switches tasks. */
static void check_fsswitch(struct cpu *c)
{
	if (!fsswitch)
		return;
	for (int i = 0; i < 20000; i++) {
		u64 t1 = c->task, v, t2;
		__asm__ volatile("mov %%fs:0, %0" : "=r"(v) : : "memory");
		t2 = c->task;
		c->fsswitch_reads++;
		if (t1 == t2 && v != c->task_fs[t1][0]) {
			if (first(c, K_FSSWITCH)) {
				put(c, "%fs:0=");
				puthex(c, v);
				put(c, " want ");
				puthex(c, c->task_fs[t1][0]);
				put(c, " after ");
				putu(c, c->switches);
				put(c, " switches");
				flush_line(c);
			}
			c->fsswitch_bad++;
			return;
		}
	}
}

/* User mode: after each switch, ROOT_VA shows the current root's frame. */
static void check_roots(struct cpu *c)
{
	for (u64 k = 0; k < 24; k++) {
		u64 r = (c->rounds * 5 + k * 7) % NROOTS;
		ucall(UCALL_SWITCH, r);
		u64 v = *(volatile u64 *)(ROOT_VA + (u64)c->id * 0x1000);
		u64 want = 0x700700000000ull | (u64)c->id << 16 | r;
		if (v != want) {
			if (first(c, K_ROOTS)) {
				put(c, "root ");
				putu(c, r);
				put(c, " showed ");
				puthex(c, v);
				put(c, " want ");
				puthex(c, want);
				flush_line(c);
			}
			c->roots_bad++;
		}
	}
	ucall(UCALL_SWITCH, NROOTS);                 /* back to entry.S's tables */
}

static void report(struct cpu *out, struct cpu *c, const char *tag)
{
	struct cpu *o = out;
	put(o, tag);
	put(o, " cpu");
	putu(o, (u64)c->id);
	put(o, " t=");
	putu(o, pm_elapsed / PM_HZ);
	put(o, " rounds=");
	putu(o, c->rounds);
	put(o, " regs=");
	putu(o, c->regs_bad);
	put(o, " xmm=");
	putu(o, c->xmm_bad);
	put(o, " ucall=");
	putu(o, c->ucall_bad);
	put(o, " pio=");
	putu(o, c->pio_bad);
	put(o, " fpu=");
	putu(o, c->fpu_bad);
	put(o, " fx=");
	putu(o, c->fx_bad);
	put(o, " sys=");
	putu(o, c->sys_bad);
	put(o, " pf=");
	putu(o, c->pf_bad);
	put(o, " shoot_ipi=");
	putu(o, c->shoot_bad_ipi);
	put(o, " shoot_pv=");
	putu(o, c->shoot_bad_pv);
	put(o, " fsswitch=");
	putu(o, c->fsswitch_bad);
	put(o, " roots=");
	putu(o, c->roots_bad);
	put(o, " remap=");
	putu(o, c->remap_bad);
	put(o, " sum=");
	putu(o, c->sum_bad);
	put(o, " fsgs=");
	putu(o, c->fsgs_bad);
	put(o, " mem_k=");
	putu(o, c->mem_k_bad);
	put(o, " mem_u=");
	putu(o, c->mem_u_bad);
	put(o, " syscalls=");
	putu(o, c->syscalls);
	put(o, " pfs=");
	putu(o, c->pfs);
	put(o, " shoots_ipi=");
	putu(o, c->shoots_ipi);
	put(o, " shoots_pv=");
	putu(o, c->shoots_pv);
	put(o, " seen_preempted=");
	putu(o, c->seen_preempted);
	put(o, " steal_ns=");
	putu(o, pv_tlb_flush ? *(volatile u64 *)(STEAL_TIME + 64 * (u64)c->id) : 0);
	put(o, " switches=");
	putu(o, c->switches);
	put(o, " root_switches=");
	putu(o, c->root_switches);
	put(o, " irqs=");
	putu(o, c->ticks);
	put(o, " irqs_user=");
	putu(o, c->irqs_user);
	put(o, " b_xmm=");
	putu(o, c->b_bad);
	put(o, " preempts=");
	putu(o, c->preempts);
	put(o, " b_rounds=");
	putu(o, c->b_rounds);
	put(o, " pf_preempts=");
	putu(o, c->pf_preempts);
	flush_line(o);
	if (c->b_bad) {
		put(o, "ucheck: cpu");
		putu(o, (u64)c->id);
		put(o, " first b_xmm mismatch: ");
		puthex(o, c->b_first_got);
		put(o, " want ");
		puthex(o, c->b_first_want);
		flush_line(o);
	}
}

static u64 bad_total(struct cpu *c)
{
	return c->regs_bad + c->xmm_bad + c->ucall_bad + c->pio_bad + c->roots_bad + c->fsswitch_bad + c->remap_bad + c->shoot_bad_ipi + c->shoot_bad_pv + c->sys_bad + c->pf_bad + c->fpu_bad + c->fx_bad + c->sum_bad + c->fsgs_bad +
		c->mem_k_bad + c->mem_u_bad + c->b_bad;
}

static void user_rounds(struct cpu *c)
{
	u64 next_report = PM_HZ, next_kcheck = 0;
	c->in_user = 1;
	while (!stop && pm_elapsed < end_ticks) {
		c->rounds++;
		int slow = c->rounds % pio == 0;     /* the rounds with a VMM exit in a ucall */
		if (c->id == 0 && slow) {
			u32 now = (u32)ucall(UCALL_PMTMR, 0);
			pm_elapsed += (u32)(now - pm_last);
			pm_last = now;
		}
		remap_start(c);
		check_regs(c, 0);
		if (ucalls) {
			check_regs(c, UCALL_NOP);
			check_regs(c, UCALL_FPUSWAP);
			if (slow)
				check_regs(c, UCALL_PIO);
			/* vmrun arms its syscall fix-up on its once-a-second vCPU kick: from 2 s on */
			if (pm_elapsed >= 2 * PM_HZ) {
				check_regs(c, MODE_SYSCALL);
				check_fsswitch(c);
				ucall(UCALL_UNMAP, 0);
				check_regs(c, MODE_PF);
				check_pf_write(c);
			}
		}
		check_sum(c);
		if (fsswitch)
			check_fsswitch(c);
		else
			check_fsgs(c);
		int kc = kcheck && pm_elapsed >= next_kcheck;
		if (kc)
			next_kcheck = pm_elapsed + kcheck * PM_HZ / 1000;
		check_mem(c, c->rounds, kc);
		check_remap(c);
		check_roots(c);
		if (ncpus > 1 && c->id == 0)
			ucall(UCALL_SHOOT, 0);
		if (ncpus > 1 && c->id == 1)
			check_shared(c);
		if (c->id == 0 && pm_elapsed >= next_report) {
			next_report += PM_HZ;
			for (int i = 0; i < ncpus; i++)
				report(c, &cpus[i], "ucheck:");
		}
	}
}

static u8 user_stack[MAXCPU][65536] __attribute__((aligned(16)));

static void bsp_user(void)
{
	struct cpu *c = &cpus[0];
	user_rounds(c);
	stop = 1;
	/* the AP's last round */
	for (volatile u64 i = 0; i < 10000000; i++)
		;
	u64 bad = 0;
	for (int i = 0; i < ncpus; i++) {
		report(c, &cpus[i], "ucheck: done");
		bad += bad_total(&cpus[i]);
	}
	finish(c, bad ? 1 : 0);
}

static void ap_user(void)
{
	struct cpu *c = &cpus[1];
	user_rounds(c);
	for (;;)
		cpu_relax();
}

/* -- command line and CPU set-up (CPL0) -------------------------------------------------- */
static u8 sys_stack[MAXCPU][16384] __attribute__((aligned(16)));

static void cpu_setup(struct cpu *c, int id)
{
	u64 cr4;
	c->id = id;
	__asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
	cr4 |= (1 << 9) | (1 << 10);                 /* OSFXSR, OSXMMEXCPT: SSE in user mode */
	__asm__ volatile("mov %0, %%cr4" : : "r"(cr4));
	c->fs_marker[0] = 0xf5f5f5f500000000ull | (u64)id;
	c->gs_marker[0] = 0x6565656500000000ull | (u64)id;
	u64 gs = GS_PAGES + (u64)id * 0x2000;
	*(volatile u64 *)gs = c->gs_marker[0];
	c->task_fs[0][0] = 0xf0f0000000000000ull | (u64)id << 8;
	c->task_fs[1][0] = 0xf1f1000000000000ull | (u64)id << 8 | 1;
	c->task = 0;
	wrmsr(0xC0000100, fsswitch ? (u64)(uintptr_t)c->task_fs[0] : (u64)(uintptr_t)c->fs_marker);
	wrmsr(0xC0000101, gs);                               /* GS_BASE: the user's */
	c->kgs[1] = (u64)(uintptr_t)(sys_stack[id] + sizeof(sys_stack[id]));
	wrmsr(0xC0000102, (u64)(uintptr_t)c->kgs);          /* KERNEL_GS_BASE: swapgs's */
	wrmsr(0xC0000080, rdmsr(0xC0000080) | 1);           /* EFER.SCE */
	wrmsr(0xC0000081, (0x40ull << 48) | (0x08ull << 32)); /* STAR: sysret CS 0x50, SS 0x48 */
	wrmsr(0xC0000082, HIGH + (u64)(uintptr_t)syscall_entry);   /* LSTAR, in the upper half */
	wrmsr(0xC0000084, 0x47700);                          /* SFMASK: TF DF IF IOPL AC NT, as Linux */
	c->region = (option("huge", 0) ? REGION_HUGE : REGION_SMALL) + (u64)id * REGION_SIZE;
	roots_setup(c);
	preempt_setup(c);
	if (pv_tlb_flush)
		wrmsr(0x4b564d03, (STEAL_TIME + 64 * (u64)id) | 1);   /* MSR_KVM_STEAL_TIME */
	wr32(LAPIC + 0xF0, 0x1FF);                   /* software enable, spurious vector 0xFF */
	if (hz) {
		wr32(LAPIC + 0x3E0, 0xB);                /* divide by 1 */
		wr32(LAPIC + 0x320, 0x20 | (1 << 17));   /* periodic, vector 0x20 */
		wr32(LAPIC + 0x380, (u32)(1000000000ull / hz));  /* KVM's APIC bus: 1 GHz */
	}
}

/*
 * The second vCPU: INIT/SIPI start it in real mode at 0x8000, where start_ap copied
 * ap_entry16; it loads ap_gdt (flat code/data as entry.S's, a 32-bit code segment at 0x38,
 * its own TSS at 0x28), enters long mode on the BSP's page tables (ap_cr3) and calls
 * ap_main on ap_kstack with the BSP's IDT.
 */
extern void ap_entry16(void), ap_entry16_end(void);
static void gdt_setup(void);
u64 ap_cr3;
u64 ap_gdt[11] __attribute__((aligned(16)));
struct __attribute__((packed)) { u16 limit; u64 base; } ap_idt_ptr;
static u8 ap_kstack[16384] __attribute__((aligned(16)));
u64 ap_kstack_top;
static u32 ap_tss[26] __attribute__((aligned(16)));
__asm__(
	".text\n"
	".code16\n"
	".globl ap_entry16, ap_entry16_end\n"
	"ap_entry16:\n"
	"	cli\n"
	"	mov %cs, %ax\n"
	"	mov %ax, %ds\n"
	"	lgdtl ap_gdt_ptr16 - ap_entry16\n"
	"	mov %cr0, %eax\n"
	"	or $1, %eax\n"
	"	mov %eax, %cr0\n"
	"	ljmpl $0x38, $ap_entry32\n"
	"	.p2align 2\n"
	"ap_gdt_ptr16:\n"
	"	.word 11 * 8 - 1\n"
	"	.long ap_gdt\n"
	"ap_entry16_end:\n"
	".code32\n"
	"ap_entry32:\n"
	"	mov $0x10, %ax\n"
	"	mov %ax, %ds\n"
	"	mov %ax, %es\n"
	"	mov %ax, %ss\n"
	"	mov %cr4, %eax\n"
	"	or $0x20, %eax\n"
	"	mov %eax, %cr4\n"
	"	mov ap_cr3, %eax\n"
	"	mov %eax, %cr3\n"
	"	mov $0xC0000080, %ecx\n"
	"	rdmsr\n"
	"	or $0x100, %eax\n"
	"	wrmsr\n"
	"	mov %cr0, %eax\n"
	"	or $0x80000001, %eax\n"
	"	mov %eax, %cr0\n"
	"	ljmp $0x08, $ap_entry64\n"
	".code64\n"
	"ap_entry64:\n"
	"	mov $0x10, %ax\n"
	"	mov %ax, %ds\n"
	"	mov %ax, %es\n"
	"	mov %ax, %ss\n"
	"	mov ap_kstack_top, %rsp\n"
	"	mov $0x28, %ax\n"
	"	ltr %ax\n"
	"	lidt ap_idt_ptr\n"
	"	call ap_main\n"
	"1:	hlt\n"
	"	jmp 1b\n");

void ap_main(void)
{
	struct cpu *c = &cpus[1];
	cpu_setup(c, 1);
	__atomic_store_n(&cpus_up, 2, __ATOMIC_RELEASE);
	enter_user_flags(ap_user, (u64)(uintptr_t)(user_stack[1] + sizeof(user_stack[1])), 0x202);
}

/* One GDT for both CPUs (entry.S's selectors, a 32-bit code segment for the AP's way up,
   the AP's TSS, and the pair SYSRET wants), loaded on the BSP. */
static void gdt_setup(void)
{
	u64 tss = (u64)(uintptr_t)ap_tss;
	ap_kstack_top = (u64)(uintptr_t)(ap_kstack + sizeof(ap_kstack));
	ap_tss[1] = (u32)ap_kstack_top;                      /* RSP0 */
	ap_tss[2] = (u32)(ap_kstack_top >> 32);
	ap_tss[25] = 104u << 16;                             /* no I/O permission bitmap */
	ap_gdt[0] = 0;
	ap_gdt[1] = 0x00AF9A000000FFFFull;                   /* 0x08: kernel code, 64-bit */
	ap_gdt[2] = 0x00CF92000000FFFFull;                   /* 0x10: kernel data */
	ap_gdt[3] = 0x00AFFA000000FFFFull;                   /* 0x18: user code */
	ap_gdt[4] = 0x00CFF2000000FFFFull;                   /* 0x20: user data */
	ap_gdt[5] = 0x0000890000000067ull | (tss & 0xFFFFFF) << 16 | ((tss >> 24) & 0xFF) << 56;
	ap_gdt[6] = tss >> 32;                               /* 0x28: the AP's TSS */
	ap_gdt[7] = 0x00CF9A000000FFFFull;                   /* 0x38: 32-bit code, for the way up */
	ap_gdt[8] = 0;
	ap_gdt[9] = 0x00CFF2000000FFFFull;                   /* 0x48: user data (sysret SS) */
	ap_gdt[10] = 0x00AFFA000000FFFFull;                  /* 0x50: user code (sysret CS) */
	struct __attribute__((packed)) { u16 limit; u64 base; } gp = {
		sizeof(ap_gdt) - 1, (u64)(uintptr_t)ap_gdt};
	__asm__ volatile("lgdt %0" : : "m"(gp));            /* TR keeps the BSP's TSS */}

/* #UD and #PF to their upper-half aliases (where vmrun's syscall fix-up looks). */
static void idt_setup(void)
{
	struct __attribute__((packed)) { u16 limit; u64 base; } ip;
	__asm__ volatile("sidt %0" : "=m"(ip));
	for (int v = 6; v <= 14; v += 8) {
		volatile u32 *g = (volatile u32 *)(ip.base + 16 * (u64)v);
		u64 off = (u64)(g[0] & 0xFFFF) | (u64)(g[1] & 0xFFFF0000) | (u64)g[2] << 32;
		if (v == 14)
			off = (u64)(uintptr_t)pf_entry;
		off |= HIGH;
		g[0] = (g[0] & 0xFFFF0000) | (u32)(off & 0xFFFF);
		g[1] = (g[1] & 0x0000FFFF) | (u32)(off & 0xFFFF0000);
		g[2] = (u32)(off >> 32);
	}
}

static void start_ap(void)
{
	__asm__ volatile("mov %%cr3, %0" : "=r"(ap_cr3));
	__asm__ volatile("sidt %0" : "=m"(ap_idt_ptr));
	/* The trampoline goes to 0x8000 (SIPI vector 8); INIT, then two SIPIs. */
	memcpy((void *)0x8000, (const void *)ap_entry16,
	       (unsigned long)((uintptr_t)ap_entry16_end - (uintptr_t)ap_entry16));
	wr32(LAPIC + 0x310, 1u << 24);
	wr32(LAPIC + 0x300, 0x4500);                 /* INIT */
	for (int i = 0; i < 2; i++) {
		wr32(LAPIC + 0x310, 1u << 24);
		wr32(LAPIC + 0x300, 0x4608);             /* SIPI, vector 8 */
		for (volatile int d = 0; d < 200 && cpus_up < 2; d++)
			;
	}
	for (u64 d = 0; cpus_up < 2; d++)
		if (d > 50000000) {
			console_write("ucheck: the second vCPU did not start\n");
			outb(DEBUG_EXIT, 1);
		}
}

void kernel_main(void)
{
	cmdline_init();
	u64 secs = option("secs", 10);
	hz = option("hz", 250);
	spin = option("spin", 200000);
	kcheck = option("kcheck", 500);
	ucalls = option("ucalls", 1);
	pio = option("pio", 8);
	if (!pio)
		pio = 1;
	ncpus = (int)option("cpus", 1);
	if (ncpus < 1 || ncpus > MAXCPU)
		ncpus = 1;
	end_ticks = secs * PM_HZ;              /* the clock: vmrun's ACPI PM timer */
	pm_last = inl(PM_TMR);
	for (u64 i = 0; i < DATA_SIZE / 8; i++)
		((volatile u64 *)DATA_BASE)[i] = i * 0x9E3779B97F4A7C15ull;
	sum_expect = fnv((const volatile u8 *)DATA_BASE, DATA_SIZE);     /* at CPL0 */
	u32 a, b, cc, dd;
	__asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(cc), "=d"(dd) : "a"(0x40000001), "c"(0));
	/* KVM_FEATURE_STEAL_TIME and PV_TLB_FLUSH, unless pvflush=0 */
	fsswitch = option("fsswitch", 1);
	preempt = option("preempt", 1);
	pv_tlb_flush = option("pvflush", 1) && (a & (1 << 5)) && (a & (1 << 9));
	gdt_setup();
	idt_setup();
	cpu_setup(&cpus[0], 0);
	cpus_up = 1;
	if (ncpus > 1)
		start_ap();
	console_write("ucheck: start\n");
	enter_user_flags(bsp_user, (u64)(uintptr_t)(user_stack[0] + sizeof(user_stack[0])), 0x202);
}
