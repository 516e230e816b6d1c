/*
 * PVH entry for vmrun's native test guests: 32-bit protected mode, paging off (PVH boot ABI).
 *
 * Builds identity page tables for the low 4 GiB (user-accessible), enters long
 * mode, installs a GDT with a TSS and an IDT, and calls kernel_main() at CPL0. That does the
 * set-up that needs port I/O, then calls enter_user() to run the program's hot loop at CPL3:
 * on kvm-pvm, where guest kernel code is emulated instruction by instruction, user code runs
 * at native speed (port I/O, which kvm-pvm refuses at CPL3 even with IOPL=3, stays in kernel
 * mode). User code calls back into the kernel with `ud2` (see ucall() in runtime.h): the #UD
 * handler runs ucall_handler() on the saved registers and returns past the ud2. Any other
 * exception reports its vector on the debug console and ends the VM.
 */
	.section .note.pvh, "a"
	.p2align 2
	.long 4, 4, 18              /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.long _start

	.section .text.entry, "ax"
	.code32
	.globl _start
_start:
	cld
	mov %ebx, start_info_paddr   /* PVH: physical address of struct hvm_start_info */
	/* Identity map of 0..4 GiB, user-accessible. The low 64 MiB (program, rings, buffers)
	 * and the first 16 MiB of the PCI hole (BARs) use 4 KiB pages, the rest 2 MiB pages:
	 * on kvm-pvm, user-mode accesses through a 2 MiB guest page reached host pages other
	 * than guest RAM's (data vanished whenever the host allocated memory), 4 KiB is sound. */
	lea pt_low, %edi
	xor %ecx, %ecx
1:	mov %ecx, %eax
	shl $12, %eax
	or $0x7, %eax               /* present, writable, user */
	mov %eax, (%edi,%ecx,8)
	movl $0, 4(%edi,%ecx,8)
	inc %ecx
	cmp $16384, %ecx
	jne 1b
	lea pt_mmio, %edi
	xor %ecx, %ecx
1:	mov %ecx, %eax
	shl $12, %eax
	add $0xC0000000, %eax
	or $0x1F, %eax              /* present, writable, user, write-through, cache-disable */
	mov %eax, (%edi,%ecx,8)
	movl $0, 4(%edi,%ecx,8)
	inc %ecx
	cmp $4096, %ecx
	jne 1b
	lea pd, %edi
	xor %ecx, %ecx
1:	mov %ecx, %eax
	shl $21, %eax
	or $0x87, %eax              /* present, writable, user, 2 MiB page */
	mov %eax, (%edi,%ecx,8)
	movl $0, 4(%edi,%ecx,8)
	inc %ecx
	cmp $2048, %ecx
	jne 1b
	lea pd, %edi                /* PD[0..31] -> the low page tables */
	lea pt_low, %eax
	or $0x7, %eax
	xor %ecx, %ecx
1:	mov %eax, (%edi,%ecx,8)
	add $4096, %eax
	inc %ecx
	cmp $32, %ecx
	jne 1b
	lea pd + 3 * 4096, %edi     /* PD[3][0..7] -> the PCI-hole page tables */
	lea pt_mmio, %eax
	or $0x7, %eax
	xor %ecx, %ecx
1:	mov %eax, (%edi,%ecx,8)
	add $4096, %eax
	inc %ecx
	cmp $8, %ecx
	jne 1b
	/* PDPT[0..3] -> the four page directories; PML4[0] -> PDPT. */
	lea pdpt, %edi
	lea pd, %eax
	or $0x7, %eax
	xor %ecx, %ecx
2:	mov %eax, (%edi,%ecx,8)
	add $4096, %eax
	inc %ecx
	cmp $4, %ecx
	jne 2b
	lea pml4, %edi
	lea pdpt, %eax
	or $0x7, %eax
	mov %eax, (%edi)
	/* PML4[256] -> the same PDPT, supervisor-only: the low 4 GiB again at
	 * 0xFFFF800000000000, so a program can put handlers in the upper half, where a kernel's
	 * are (ucheck does, for vmrun's syscall fix-up, which only follows handlers there). */
	and $~4, %eax
	mov %eax, 256 * 8(%edi)

	mov %cr4, %eax
	or $0x20, %eax              /* PAE */
	mov %eax, %cr4
	lea pml4, %eax
	mov %eax, %cr3
	mov $0xC0000080, %ecx       /* EFER.LME */
	rdmsr
	or $0x100, %eax
	wrmsr
	lgdt gdt_ptr
	mov %cr0, %eax
	or $0x80000001, %eax        /* PG | PE */
	mov %eax, %cr0
	ljmp $0x08, $long_mode

	.code64
long_mode:
	mov $0x10, %ax
	mov %ax, %ds
	mov %ax, %es
	mov %ax, %ss
	mov $kernel_stack_top, %rsp
	/* The TSS descriptor (GDT 0x28): its base is only known at link time, in four pieces. */
	mov $tss, %rax
	mov %ax, gdt + 0x28 + 2
	shr $16, %rax
	mov %al, gdt + 0x28 + 4
	shr $8, %rax
	mov %al, gdt + 0x28 + 7
	shr $8, %rax
	mov %eax, gdt + 0x28 + 8
	movq $kernel_stack_top, tss + 4      /* RSP0: the stack a CPL3 -> CPL0 exception uses */
	movw $104, tss + 102                 /* no I/O permission bitmap */
	mov $0x28, %ax
	ltr %ax
	/* IDT: vector 6 (#UD) -> ud_entry, the other 31 exceptions -> fault_entries[v],
	 * vectors 32..255 (interrupts) -> irq_entries[v - 32]. */
	xor %ecx, %ecx
3:	mov $fault_entries, %rax
	imul $16, %rcx, %rdx
	add %rdx, %rax
	cmp $32, %ecx
	jb 6f
	mov $irq_entries - 32 * 16, %rax
	add %rdx, %rax
	jmp 4f
6:	cmp $6, %ecx
	jne 4f
	mov $ud_entry, %rax
4:	imul $16, %rcx, %rdx
	add $idt, %rdx
	mov %ax, (%rdx)                      /* offset 15:0 */
	movw $0x08, 2(%rdx)                  /* kernel code selector */
	movw $0x8E00, 4(%rdx)                /* present, interrupt gate, DPL 0 */
	shr $16, %rax
	mov %ax, 6(%rdx)                     /* offset 31:16 */
	shr $16, %rax
	mov %eax, 8(%rdx)                    /* offset 63:32 */
	movl $0, 12(%rdx)
	inc %ecx
	cmp $256, %ecx
	jne 3b
	lidt idt_ptr
	call kernel_main
5:	hlt
	jmp 5b

/* enter_user(fn, stack_top): iretq to fn at CPL3 (RFLAGS: IF=0). */
	.globl enter_user
enter_user:
	pushq $0x23
	pushq %rsi
	pushq $0x2
	pushq $0x1b
	pushq %rdi
	iretq

/* enter_user_flags(fn, stack_top, rflags): the same with the caller's RFLAGS (IF=1: the
   program takes interrupts in user mode). */
	.globl enter_user_flags
enter_user_flags:
	pushq $0x23
	pushq %rsi
	pushq %rdx
	pushq $0x1b
	pushq %rdi
	iretq

/* ucall(op, arg) from user mode: callee-saved registers go to the stack around the ud2,
   because they come back zeroed from kvm-pvm's return to user mode. */
	.globl ucall
ucall:
	push %rbx
	push %rbp
	push %r12
	push %r13
	push %r14
	push %r15
	ud2
	pop %r15
	pop %r14
	pop %r13
	pop %r12
	pop %rbp
	pop %rbx
	ret

/* #UD from user mode: a ucall. Save the registers, let C look at them, skip the ud2. */
ud_entry:
	push %rax
	push %rbx
	push %rcx
	push %rdx
	push %rsi
	push %rdi
	push %rbp
	push %r8
	push %r9
	push %r10
	push %r11
	push %r12
	push %r13
	push %r14
	push %r15
	mov %rsp, %rdi
	call ucall_handler
	pop %r15
	pop %r14
	pop %r13
	pop %r12
	pop %r11
	pop %r10
	pop %r9
	pop %r8
	pop %rbp
	pop %rdi
	pop %rsi
	pop %rdx
	pop %rcx
	pop %rbx
	pop %rax
	iretq

/* Interrupts (vectors 32..255): irq_handler(vector, frame) with the frame laid out as
   ud_entry's, then iretq. A program that enables none gets the weak default below. */
	.p2align 4
irq_entries:
	.set v, 32
	.rept 224
	.p2align 4
	push %rax
	mov $v, %eax
	jmp irq_common
	.set v, v + 1
	.endr
irq_common:
	push %rbx
	push %rcx
	push %rdx
	push %rsi
	push %rdi
	push %rbp
	push %r8
	push %r9
	push %r10
	push %r11
	push %r12
	push %r13
	push %r14
	push %r15
	mov %eax, %edi
	mov %rsp, %rsi
	call irq_handler
	pop %r15
	pop %r14
	pop %r13
	pop %r12
	pop %r11
	pop %r10
	pop %r9
	pop %r8
	pop %rbp
	pop %rdi
	pop %rsi
	pop %rdx
	pop %rcx
	pop %rbx
	pop %rax
	iretq

/* The default irq_handler: an interrupt nobody asked for is reported like an exception. */
	.weak irq_handler
irq_handler:
	add $15 * 8, %rsi
	jmp fault_handler

/* Every other exception: fault_handler(vector, stack) never returns. */
	.p2align 4
fault_entries:
	.set v, 0
	.rept 32
	.p2align 4
	mov $v, %edi
	mov %rsp, %rsi
	jmp fault_handler
	.set v, v + 1
	.endr

	.section .data
	.globl start_info_paddr
	.p2align 3
start_info_paddr:
	.long 0
	.p2align 3
gdt:
	.quad 0
	.quad 0x00AF9A000000FFFF    /* 0x08: kernel code, 64-bit */
	.quad 0x00CF92000000FFFF    /* 0x10: kernel data */
	.quad 0x00AFFA000000FFFF    /* 0x18: user code, 64-bit, DPL3 */
	.quad 0x00CFF2000000FFFF    /* 0x20: user data, DPL3 */
	.quad 0x0000890000000067    /* 0x28: 64-bit TSS, limit 103 (base filled in) */
	.quad 0
gdt_end:
gdt_ptr:
	.word gdt_end - gdt - 1
	.long gdt
	.p2align 3
idt_ptr:
	.word 256 * 16 - 1
	.quad idt

	.section .bss
	.p2align 12
pml4:	.skip 4096
pdpt:	.skip 4096
pd:	.skip 4096 * 4
pt_low:	.skip 4096 * 32
pt_mmio: .skip 4096 * 8
idt:	.skip 256 * 16
	.p2align 4
tss:	.skip 104
	.p2align 4
	.skip 16384
kernel_stack_top:

	.section .note.GNU-stack, "", @progbits
