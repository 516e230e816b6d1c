/* The yardstick for vmrun's exit path: a bare C KVM loop running the same real-mode guests as
 * bench/exit_rate.py and printing exits per second.
 *
 *   kvm_exit_loop N [pio|mmio]
 *
 * pio:  N `out 0x10, al` to an unused port, then hlt (KVM_EXIT_IO).
 * mmio: N `mov [0], al` with DS = 0xD000, i.e. stores to guest-physical 0xD0000, which no
 *       memory slot covers (RAM is the first 64 KiB), then hlt (KVM_EXIT_MMIO). The loop
 *       decodes each exit the way a VMM must (address, length, data) and checks it. */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>

#define MMIO_ADDR 0xD0000UL

int main(int argc, char **argv) {
    unsigned n = argc > 1 ? (unsigned)atoi(argv[1]) : 100000;
    int mmio = argc > 2 && strcmp(argv[2], "mmio") == 0;
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) { perror("/dev/kvm"); return 1; }
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    size_t size = 0x10000;
    unsigned char *mem = mmap(0, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    struct kvm_userspace_memory_region region = {0, 0, 0, size, (unsigned long)mem};
    ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region);
    ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000);
    /* mov ecx, n; 1: out 0x10, al; dec ecx; jnz 1b; hlt */
    unsigned char pio_code[] = {0x66, 0xb9, 0, 0, 0, 0, 0xe6, 0x10, 0x66, 0x49, 0x75, 0xfa, 0xf4};
    /* mov ax, 0xd000; mov ds, ax; mov al, 0x5a; mov ecx, n;
     * 1: mov [0], al; dec ecx; jnz 1b; hlt */
    unsigned char mmio_code[] = {0xb8, 0x00, 0xd0, 0x8e, 0xd8, 0xb0, 0x5a, 0x66, 0xb9, 0, 0, 0, 0,
                                 0xa2, 0x00, 0x00, 0x66, 0x49, 0x75, 0xf9, 0xf4};
    if (mmio) {
        memcpy(mmio_code + 9, &n, 4);
        memcpy(mem + 0x1000, mmio_code, sizeof mmio_code);
    } else {
        memcpy(pio_code + 2, &n, 4);
        memcpy(mem + 0x1000, pio_code, sizeof pio_code);
    }
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(0, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    struct kvm_sregs sregs;
    ioctl(vcpu, KVM_GET_SREGS, &sregs);
    sregs.cs.base = 0; sregs.cs.selector = 0;
    ioctl(vcpu, KVM_SET_SREGS, &sregs);
    struct kvm_regs regs = {0};
    regs.rip = 0x1000; regs.rflags = 2;
    ioctl(vcpu, KVM_SET_REGS, &regs);
    struct timespec t0, t1;
    unsigned long exits = 0, bad = 0;
    volatile unsigned long sink = 0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) { perror("KVM_RUN"); return 1; }
        if (run->exit_reason == KVM_EXIT_IO) { exits++; continue; }
        if (run->exit_reason == KVM_EXIT_MMIO) {
            exits++;
            if (!run->mmio.is_write || run->mmio.phys_addr != MMIO_ADDR || run->mmio.len != 1)
                bad++;
            sink += run->mmio.data[0];
            continue;
        }
        if (run->exit_reason == KVM_EXIT_HLT) break;
        fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
        return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (bad) { fprintf(stderr, "%lu malformed MMIO exits\n", bad); return 1; }
    double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("%lu %.6f\n", exits, s);
    return 0;
}
