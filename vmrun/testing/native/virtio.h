/*
 * virtio.h: the virtio 1.x PCI transport of the native guests that drive a virtio device
 * (vblk, vnet); included after runtime.h. Split queues, no interrupts: the guest polls the
 * used rings.
 *
 *	virtio_setup(slot, features)   capabilities, reset, negotiation (VERSION_1 + features)
 *	virtq_setup(&q, index, base)   one queue at guest-physical base, at most VIRTQ_MAX long
 *	virtio_driver_ok()             the device may start
 *	virtq_kick(&q)                 publish the avail index, notify
 */
#ifndef NATIVE_VIRTIO_H
#define NATIVE_VIRTIO_H

#define VIRTQ_MAX 256

/* Capability types (struct virtio_pci_cap.cfg_type). */
enum { COMMON_CFG = 1, NOTIFY_CFG = 2, DEVICE_CFG = 4 };
/* struct virtio_pci_common_cfg offsets */
enum {
	DFSELECT = 0x00, DF = 0x04, GFSELECT = 0x08, GF = 0x0C, NUM_QUEUES = 0x12,
	STATUS = 0x14, Q_SELECT = 0x16, Q_SIZE = 0x18, Q_MSIX = 0x1A, Q_ENABLE = 0x1C,
	Q_NOTIFY_OFF = 0x1E, Q_DESC = 0x20, Q_DRIVER = 0x28, Q_DEVICE = 0x30,
};
enum { S_ACK = 1, S_DRIVER = 2, S_DRIVER_OK = 4, S_FEATURES_OK = 8 };
enum { F_NEXT = 1, F_WRITE = 2 };

struct desc { u64 addr; u32 len; u16 flags; u16 next; };

struct vq {
	volatile struct desc *descs;
	volatile u16 *avail;     /* flags, idx, ring[size] */
	volatile u16 *used;      /* flags, idx, then {u32 id, u32 len}[size] */
	u64 notify;
	u16 size, avail_idx, used_seen;
};

static u64 common, notify_base, devcfg;
static u32 notify_mult;

/* The common, notify and device configuration of slot, through its vendor capabilities;
 * the device reset, then VIRTIO_F_VERSION_1 and what it offers of features (bits 0..31)
 * negotiated: returns those. */
static RT_UNUSED u32 virtio_setup(int slot, u32 features)
{
	for (int p = pci_read(slot, 0x34) & 0xFC, n = 0; p && n < 48; p = pci_read(slot, p + 1) & 0xFC, n++) {
		if ((pci_read(slot, p) & 0xFF) != 0x09)
			continue;
		int type = pci_read(slot, p + 3) & 0xFF;
		u64 base = bar_address(slot, pci_read(slot, p + 4) & 0xFF) + pci_read(slot, p + 8);
		if (type == COMMON_CFG && !common)
			common = base;
		else if (type == NOTIFY_CFG && !notify_base) {
			notify_base = base;
			notify_mult = pci_read(slot, p + 16);
		} else if (type == DEVICE_CFG && !devcfg)
			devcfg = base;
	}
	if (!common || !notify_base || !devcfg)
		fail("virtio capabilities missing on slot", (u64)slot);
	wr8(common + STATUS, 0);
	while (rd8(common + STATUS))
		cpu_relax();
	wr8(common + STATUS, S_ACK | S_DRIVER);
	wr32(common + DFSELECT, 1);
	if (!(rd32(common + DF) & 1))
		fail("device does not offer VIRTIO_F_VERSION_1", 0);
	wr32(common + DFSELECT, 0);
	u32 want = rd32(common + DF) & features;
	wr32(common + GFSELECT, 0);
	wr32(common + GF, want);
	wr32(common + GFSELECT, 1);
	wr32(common + GF, 1);
	wr8(common + STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
	if (!(rd8(common + STATUS) & S_FEATURES_OK))
		fail("FEATURES_OK refused", rd8(common + STATUS));
	return want;
}

/* Queue index at base (descriptors, then the avail and used rings), interrupts off. */
static RT_UNUSED void virtq_setup(struct vq *q, int index, u64 base)
{
	wr16(common + Q_SELECT, (u16)index);
	u16 n = rd16(common + Q_SIZE);
	if (n == 0)
		fail("queue has size 0", (u64)index);
	if (n > VIRTQ_MAX)
		n = VIRTQ_MAX;
	wr16(common + Q_SIZE, n);
	wr16(common + Q_MSIX, 0xFFFF);
	u64 d = base, a = d + 16ull * n, u = (a + 6 + 2ull * n + 3) & ~3ull;
	for (u64 p = base; p < u + 6 + 8ull * n; p += 8)
		*(volatile u64 *)p = 0;
	q->descs = (volatile struct desc *)d;
	q->avail = (volatile u16 *)a;
	q->used = (volatile u16 *)u;
	q->size = n;
	q->avail_idx = q->used_seen = 0;
	q->avail[0] = 1;         /* VIRTQ_AVAIL_F_NO_INTERRUPT: we poll the used ring */
	wr64(common + Q_DESC, d);
	wr64(common + Q_DRIVER, a);
	wr64(common + Q_DEVICE, u);
	q->notify = notify_base + (u64)rd16(common + Q_NOTIFY_OFF) * notify_mult;
	wr16(common + Q_ENABLE, 1);
}

static RT_UNUSED void virtio_driver_ok(void)
{
	wr8(common + STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
}

static RT_UNUSED void virtq_kick(struct vq *q)
{
	barrier();
	q->avail[1] = q->avail_idx;
	barrier();
	wr16(q->notify, 0);
}

#endif /* NATIVE_VIRTIO_H */
