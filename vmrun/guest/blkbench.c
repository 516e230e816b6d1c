/*
 * blkbench: a small fio stand-in for the default guest's initramfs.
 *
 *   blkbench read|write|randread|randwrite DEVICE BLOCK_SIZE QUEUE_DEPTH LIMIT
 *
 * Keeps QUEUE_DEPTH O_DIRECT requests of BLOCK_SIZE bytes in flight with Linux native AIO
 * (io_submit / io_getevents, what fio's libaio engine uses), so "randread 4096 32" is
 * fio's --direct=1 --bs=4k --iodepth=32 --rw=randread. Sequential modes stop after LIMIT
 * MiB; random modes after LIMIT seconds. Prints one line:
 *
 *   blkbench: randread bs=4096 qd=32 ios=N bytes=B usecs=U iops=I kbps=K
 *
 * Built static by `vmrun image build` (the guest has no libc); no libaio needed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_QD 256

static uint64_t now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* xorshift64*: cheap, and the same offsets on every run for a given seed. */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t next_random(void)
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545F4914F6CDD1Dull;
}

static void die(const char *what)
{
	fprintf(stderr, "blkbench: %s: %s\n", what, strerror(errno));
	exit(1);
}

int main(int argc, char **argv)
{
	if (argc != 6) {
		fprintf(stderr, "usage: blkbench read|write|randread|randwrite DEVICE BS QD LIMIT\n");
		return 2;
	}
	const char *mode = argv[1];
	int writing = strstr(mode, "write") != NULL;
	int random = strncmp(mode, "rand", 4) == 0;
	long bs = atol(argv[3]), qd = atol(argv[4]), limit = atol(argv[5]);
	if (bs < 512 || bs % 512 || qd < 1 || qd > MAX_QD || limit < 1) {
		fprintf(stderr, "blkbench: bad BS, QD or LIMIT\n");
		return 2;
	}
	int fd = open(argv[2], (writing ? O_RDWR : O_RDONLY) | O_DIRECT);
	if (fd < 0)
		die(argv[2]);
	uint64_t dev_size;
	struct stat st;
	if (fstat(fd, &st) < 0)
		die("fstat");
	if (S_ISREG(st.st_mode))
		dev_size = st.st_size;          /* a plain file: lets the tool be tried on a host */
	else if (ioctl(fd, BLKGETSIZE64, &dev_size) < 0)
		die("BLKGETSIZE64");
	uint64_t blocks = dev_size / bs;
	uint64_t seq_total = random ? 0 : ((uint64_t)limit << 20) / bs;
	if (blocks == 0 || (!random && seq_total > blocks)) {
		fprintf(stderr, "blkbench: %s is too small\n", argv[2]);
		return 2;
	}

	aio_context_t ctx = 0;
	if (syscall(SYS_io_setup, qd, &ctx) < 0)
		die("io_setup");
	static struct iocb iocbs[MAX_QD];
	struct iocb *ptrs[MAX_QD];
	struct io_event events[MAX_QD];
	char *buf;
	if (posix_memalign((void **)&buf, 4096, bs * qd))
		die("posix_memalign");
	memset(buf, 0x5a, bs * qd);

	uint64_t next_block = 0, issued = 0, done = 0;
	uint64_t start = now_us(), deadline = start + (uint64_t)limit * 1000000;
	int in_flight = 0, stop = 0;
	for (;;) {
		int n = 0;
		while (!stop && in_flight + n < qd) {
			if (!random && issued == seq_total) {
				stop = 1;
				break;
			}
			int slot = (int)(issued % qd);
			struct iocb *cb = &iocbs[slot];
			uint64_t block = random ? next_random() % blocks : next_block++;
			memset(cb, 0, sizeof(*cb));
			cb->aio_fildes = fd;
			cb->aio_lio_opcode = writing ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
			cb->aio_buf = (uint64_t)(uintptr_t)(buf + (uint64_t)slot * bs);
			cb->aio_nbytes = bs;
			cb->aio_offset = block * bs;
			ptrs[n++] = cb;
			issued++;
		}
		if (n && syscall(SYS_io_submit, ctx, n, ptrs) != n)
			die("io_submit");
		in_flight += n;
		if (in_flight == 0)
			break;
		long got = syscall(SYS_io_getevents, ctx, 1, qd, events, NULL);
		if (got < 0) {
			if (errno == EINTR)
				continue;
			die("io_getevents");
		}
		for (long i = 0; i < got; i++) {
			if (events[i].res != bs) {
				errno = events[i].res < 0 ? (int)-events[i].res : EIO;
				die("request");
			}
		}
		in_flight -= got;
		done += got;
		if (random && now_us() >= deadline)
			stop = 1;
	}
	uint64_t usecs = now_us() - start;
	if (usecs == 0)
		usecs = 1;
	printf("blkbench: %s bs=%ld qd=%ld ios=%llu bytes=%llu usecs=%llu iops=%llu kbps=%llu\n",
	       mode, bs, qd, (unsigned long long)done, (unsigned long long)(done * bs),
	       (unsigned long long)usecs, (unsigned long long)(done * 1000000 / usecs),
	       (unsigned long long)(done * bs * 1000 / usecs));
	return 0;
}
