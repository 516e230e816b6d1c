/*
 * vxhci: a bare-metal xHCI driver fragment and benchmark that runs at CPL3.
 *
 * Entered from entry.S in 64-bit user mode with IOPL=3 and the low 4 GiB identity-mapped
 * (see entry.S and runtime.h). It finds the first xHCI function (class 0C0330) on PCI bus 0,
 * moves BAR 0 below 4 GiB if it is not there, resets the controller, gives it a DCBAA, a
 * command ring and one event ring segment (no interrupts: it polls the event ring) and
 * sets R/S, then runs, each between "begin NAME" and "end NAME ios=N bytes=0" lines on the
 * debug console (port 0xE9) so the host can time them:
 *
 *   bell    n writes of "slot 1, endpoint 1 IN" to a doorbell (a disabled slot: the
 *           controller does nothing; vmrun serves that value with an ioeventfd)
 *   exit    n writes of a doorbell value no ioeventfd matches (an MMIO exit each)
 *   noop    n No-Op commands, one at a time: doorbell, then spin until the completion
 *           event is in memory, then advance ERDP
 *
 * With lat=N instead it enumerates the first connected HID device (port reset, Enable Slot,
 * Address Device, Configure Endpoint for EP 1 IN, SET_CONFIGURATION) and then, N times,
 * posts one interrupt IN TD, sets STATE.ready, spins until the Transfer Event is in memory
 * and sets STATE.count: the host injects an input event after seeing "ready" and times it
 * until it sees "count" in guest RAM (host-side input latency, no exits in between).
 *
 * and ends the VM through the debug-exit port (0xF4): 0 on success, 1 on an error.
 * Options come from the PVH command line: n=N. The same ELF runs under QEMU (qemu-xhci).
 */
#define GUEST_NAME "vxhci"
/* BAR 0 goes here when firmware left it unassigned or above 4 GiB (2 MiB pages in entry.S). */
#define BAR_PLACE(slot, bar) 0xD0000000ull
#include "runtime.h"

/* Guest-physical work area (identity-mapped): DCBAA, command ring, ERST, event ring. */
#define DCBAA_BASE 0x01000000ull
#define CMD_BASE   0x01010000ull
#define ERST_BASE  0x01020000ull
#define EVT_BASE   0x01030000ull
#define CTX_BASE   0x01040000ull     /* output device context */
#define ICTX_BASE  0x01042000ull     /* input context */
#define EP0_RING   0x01050000ull
#define EP1_RING   0x01060000ull
#define DATA_BASE  0x01070000ull
#define STATE      0x01100000ull     /* u64 ready, u64 count, u64 last report */
#define RING_TRBS  64
#define CMD_TRBS   64
#define EVT_TRBS   256

static u64 regs, op, rt, db;

/* -- xHCI ------------------------------------------------------------------------------ */
static u32 evt_idx, evt_cycle = 1, cmd_idx, cmd_cycle = 1;

static void put_trb(u64 at, u64 param, u32 status, u32 control)
{
	wr64(at, param);
	wr32(at + 8, status);
	barrier();
	wr32(at + 12, control);
}

static void xhci_setup(void)
{
	int slot = pci_find_class(0x0C0330);
	if (slot < 0)
		fail("no xHCI controller on bus 0", 0);
	regs = bar_address(slot, 0);
	pci_enable(slot);                                   /* memory decoding, bus master */
	op = regs + (rd32(regs) & 0xFF);
	rt = regs + (rd32(regs + 0x18) & ~0x1Fu);
	db = regs + (rd32(regs + 0x14) & ~0x3u);
	if (rd32(regs + 0x08) >> 21)
		fail("scratchpads wanted", rd32(regs + 0x08));
	wr32(op, 0);
	while (!(rd32(op + 4) & 1))
		cpu_relax();
	wr32(op, 2);                                        /* HCRST */
	while (rd32(op) & 2 || rd32(op + 4) & (1 << 11))
		cpu_relax();
	memset((void *)DCBAA_BASE, 0, 0x40000);
	wr32(op + 0x38, rd32(regs + 4) & 0xFF);             /* MaxSlotsEn */
	wr64(op + 0x30, DCBAA_BASE);
	put_trb(CMD_BASE + 16 * (CMD_TRBS - 1), CMD_BASE, 0, 6 << 10 | 2);   /* Link, TC */
	wr64(op + 0x18, CMD_BASE | 1);
	wr64(ERST_BASE, EVT_BASE);
	wr32(ERST_BASE + 8, EVT_TRBS);
	wr32(rt + 0x28, 1);                                 /* ERSTSZ */
	wr64(rt + 0x38, EVT_BASE);                          /* ERDP */
	wr64(rt + 0x30, ERST_BASE);                         /* ERSTBA */
	wr32(op, 1);                                        /* R/S, no interrupts */
	while (rd32(op + 4) & 1)
		cpu_relax();
}

static void noop_command(void)
{
	u64 at = CMD_BASE + 16ull * cmd_idx;
	put_trb(at, 0, 0, 23 << 10 | cmd_cycle);
	if (++cmd_idx == CMD_TRBS - 1) {
		u64 link = CMD_BASE + 16ull * (CMD_TRBS - 1);
		wr32(link + 12, 6 << 10 | 2 | cmd_cycle);
		cmd_idx = 0;
		cmd_cycle ^= 1;
	}
	wr32(db, 0);
	u64 ev = EVT_BASE + 16ull * evt_idx;
	while ((rd32(ev + 12) & 1) != evt_cycle)
		cpu_relax();
	if ((rd32(ev + 12) >> 10 & 0x3F) != 33 || rd32(ev + 8) >> 24 != 1 || rd64(ev) != at)
		fail("unexpected event", rd32(ev + 12));
	if (++evt_idx == EVT_TRBS) {
		evt_idx = 0;
		evt_cycle ^= 1;
	}
	wr64(rt + 0x38, (EVT_BASE + 16ull * evt_idx) | 8);
}

/* -- latency: a tiny HID driver ---------------------------------------------------------- */
struct ring { u64 base; u32 idx, cycle; };
static struct ring ep0 = { EP0_RING, 0, 1 }, ep1 = { EP1_RING, 0, 1 };
static u32 csz = 32, slot_id;

static u64 ring_put(struct ring *r, u64 param, u32 status, u32 control)
{
	u64 at = r->base + 16ull * r->idx;
	put_trb(at, param, status, control | r->cycle);
	if (++r->idx == RING_TRBS - 1) {
		put_trb(r->base + 16ull * (RING_TRBS - 1), r->base, 0, 6 << 10 | 2 | r->cycle);
		r->idx = 0;
		r->cycle ^= 1;
	}
	return at;
}

/* The next event, consumed (ERDP advanced). */
static u64 next_event(u32 *control, u32 *status)
{
	u64 ev = EVT_BASE + 16ull * evt_idx;
	while ((rd32(ev + 12) & 1) != evt_cycle)
		cpu_relax();
	*control = rd32(ev + 12);
	*status = rd32(ev + 8);
	u64 param = rd64(ev);
	if (++evt_idx == EVT_TRBS) {
		evt_idx = 0;
		evt_cycle ^= 1;
	}
	wr64(rt + 0x38, (EVT_BASE + 16ull * evt_idx) | 8);
	return param;
}

/* Wait for the event of TRB ``at`` (others, e.g. port status changes, are skipped). */
static u32 wait_trb(u64 at, u32 *control)
{
	u32 st;
	for (;;) {
		u64 p = next_event(control, &st);
		if (p == at)
			return st;
		u32 type = *control >> 10 & 0x3F;
		if (type == 32 && st >> 24 != 1 && st >> 24 != 13)
			fail("transfer error", st);
	}
}

static u32 command(u64 param, u32 control)
{
	u64 at = CMD_BASE + 16ull * cmd_idx;
	put_trb(at, param, 0, control | cmd_cycle);
	if (++cmd_idx == CMD_TRBS - 1) {
		wr32(CMD_BASE + 16ull * (CMD_TRBS - 1) + 12, 6 << 10 | 2 | cmd_cycle);
		cmd_idx = 0;
		cmd_cycle ^= 1;
	}
	wr32(db, 0);
	u32 ctl, st = wait_trb(at, &ctl);
	if (st >> 24 != 1)
		fail("command failed", st);
	return ctl;
}

static void control(u8 rtype, u8 req, u16 value, u16 index, u16 len, u64 buf)
{
	u64 setup = rtype | (u64)req << 8 | (u64)value << 16 | (u64)index << 32 | (u64)len << 48;
	ring_put(&ep0, setup, 8, 2 << 10 | 1 << 6 | (len ? 3u << 16 : 0));
	if (len)
		ring_put(&ep0, buf, len, 3 << 10 | 1 << 2 | 1 << 16);
	u64 st = ring_put(&ep0, 0, 0, 4 << 10 | 1 << 5 | (len ? 0 : 1u << 16));
	wr32(db + 4 * slot_id, 1);
	u32 ctl;
	wait_trb(st, &ctl);
}

static void enumerate(void)
{
	if (rd32(regs + 0x10) & 4)
		csz = 64;
	u32 port = 0, nports = rd32(regs + 4) >> 24;
	for (u32 p = 1; p <= nports && !port; p++)        /* QEMU puts its USB 2 ports last */
		if (rd32(op + 0x400 + 0x10 * (p - 1)) & 1)
			port = p;
	if (!port)
		fail("no device on any port", nports);
	u64 portsc = op + 0x400 + 0x10 * (port - 1);
	wr32(portsc, 1 << 9 | 1 << 4);                     /* PP | PR */
	while (!(rd32(portsc) & (1 << 21)))
		cpu_relax();
	u32 speed = rd32(portsc) >> 10 & 0xF;
	wr32(portsc, 1 << 9 | 0x00FE0000);                 /* clear the change bits */
	slot_id = command(0, 9 << 10) >> 24;
	memset((void *)CTX_BASE, 0, 0x4000);
	wr64(DCBAA_BASE + 8ull * slot_id, CTX_BASE);
	wr32(ICTX_BASE + 4, 3);                            /* add: slot, EP0 */
	wr32(ICTX_BASE + csz, 1u << 27 | speed << 20);
	wr32(ICTX_BASE + csz + 4, port << 16);             /* root hub port */
	wr32(ICTX_BASE + 2 * csz + 4, 3 << 1 | 4 << 3 | (speed == 3 ? 64u : 8u) << 16);
	wr64(ICTX_BASE + 2 * csz + 8, EP0_RING | 1);
	wr32(ICTX_BASE + 2 * csz + 16, 8);
	command(ICTX_BASE, 11 << 10 | slot_id << 24);      /* Address Device */
	memset((void *)ICTX_BASE, 0, 0x1000);
	wr32(ICTX_BASE + 4, 1 | 1 << 3);                   /* add: slot, EP 1 IN */
	wr32(ICTX_BASE + csz, 3u << 27 | speed << 20);
	wr32(ICTX_BASE + csz + 4, port << 16);
	wr32(ICTX_BASE + 4 * csz, 3u << 16);               /* interval 2^3 microframes */
	wr32(ICTX_BASE + 4 * csz + 4, 3 << 1 | 7 << 3 | 8u << 16);
	wr64(ICTX_BASE + 4 * csz + 8, EP1_RING | 1);
	wr32(ICTX_BASE + 4 * csz + 16, 8);
	command(ICTX_BASE, 12 << 10 | slot_id << 24);      /* Configure Endpoint */
	control(0x00, 9, 1, 0, 0, 0);                      /* SET_CONFIGURATION 1 */
	control(0x21, 0x0A, 0, 0, 0, 0);                   /* SET_IDLE 0 */
}

static void latency(u64 rounds)
{
	begin_test("latency");
	for (u64 i = 0; i < rounds; i++) {
		u64 at = ring_put(&ep1, DATA_BASE, 8, 1 << 10 | 1 << 2 | 1 << 5);
		wr32(db + 4 * slot_id, 3);
		wr64(STATE, i + 1);                          /* ready: the TD is posted */
		u32 ctl;
		wait_trb(at, &ctl);
		wr64(STATE + 16, rd64(DATA_BASE));
		wr64(STATE + 8, i + 1);                      /* count: the report is in memory */
	}
	end_test("latency", "ios", rounds, 0);
}

static u64 n, lat;

static void user_main(void)
{
	in_user = 1;
	if (lat) {
		enumerate();
		latency(lat);
		put("vxhci: done");
		flush_line();
		finish(0);
	}
	begin_test("bell");
	for (u64 i = 0; i < n; i++)
		wr32(db + 4, 3);
	end_test("bell", "ios", n, 0);
	begin_test("exit");
	for (u64 i = 0; i < n; i++)
		wr32(db + 4, 0x10);
	end_test("exit", "ios", n, 0);
	begin_test("noop");
	for (u64 i = 0; i < n; i++)
		noop_command();
	end_test("noop", "ios", n, 0);
	put("vxhci: done");
	flush_line();
	finish(0);
}

void kernel_main(void)
{
	cmdline_init();
	n = option("n", 20000);
	lat = option("lat", 0);
	memset((void *)STATE, 0, 64);
	xhci_setup();
	put("vxhci: running, caplength ");
	putu(rd32(regs) & 0xFF);
	flush_line();
	run_user(user_main);
}
