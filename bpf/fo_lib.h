/* SPDX-License-Identifier: GPL-2.0 */
/* bpfailover: the logic both hooks share.  The program files are thin entry
 * points over these inlined workers (one place for the rules, as in cilium's
 * bpf/lib). */
#ifndef FO_LIB_H
#define FO_LIB_H

#include "failover.h"

static __always_inline void fo_count(__u32 idx, __u64 bytes)
{
	struct fo_counter *c = fo_stats.lookup(&idx);

	if (c) {		/* per-CPU slot: no atomics needed */
		c->packets++;
		c->bytes += bytes;
	}
}

static __always_inline void fo_count_drop(__u32 group, __u32 hook, __u32 reason, __u64 bytes)
{
	__u32 idx = FO_DROPS_IDX(group, hook, reason);
	struct fo_counter *c = fo_drops.lookup(&idx);

	if (c) {
		c->packets++;
		c->bytes += bytes;
	}
}

static __always_inline void fo_note_redirect(__u32 ifindex)
{
#ifdef FO_TEST_HOOKS
	__u32 zero = 0;
	__u32 *last = fo_last_redirect.lookup(&zero);

	if (last)
		*last = ifindex;
#endif
}

/* Transmit: the ifindex of the group's active lower, or 0 when there is none.
 * The active slot is read once; the slot's ifindex is only ever rewritten by
 * the agent while that slot is inactive. */
static __always_inline __u32 fo_tx_target(__u32 group, __u32 *slot_out)
{
	__u32 *active = fo_active.lookup(&group);
	__u32 slot, idx, *ifindex;

	if (!active)
		return 0;
	slot = *active;
	if (slot == FO_SLOT_NONE || slot >= FO_NSLOTS)
		return 0;
	idx = FO_LOWER_IDX(group, slot);
	ifindex = fo_lower.lookup(&idx);
	if (!ifindex)
		return 0;
	*slot_out = slot;
	return *ifindex;
}

enum fo_rx_verdict {
	FO_RX_NOT_OURS = 0,	/* not a registered lower: leave the frame alone */
	FO_RX_UP,		/* deliver to the failover device */
	FO_RX_DROP,		/* inactive lower under inactive_rx: drop */
	FO_RX_LOOP,		/* our own frame, flooded back by the switch: drop */
};

struct fo_rx {
	__u32 group;
	__u32 slot;
	__u32 master_ifindex;
};

/* The source MAC of an Ethernet frame as (first 4 bytes, last 2 bytes); zeros when the
 * frame is too short to have one. */
static __always_inline void fo_eth_src(void *data, void *data_end, __u32 *hi, __u32 *lo)
{
	__u16 last = 0;

	*hi = 0;
	*lo = 0;
	if (data + 14 > data_end)
		return;
	__builtin_memcpy(hi, data + 6, 4);
	__builtin_memcpy(&last, data + 10, 2);
	*lo = last;
}

/* Receive: should a frame from lower `ifindex` (source MAC src_hi/src_lo) go up to its
 * failover device? */
static __always_inline int fo_rx_decide(__u32 ifindex, __u32 src_hi, __u32 src_lo,
					struct fo_rx *rx)
{
	struct fo_dev *dev = fo_dev.lookup(&ifindex);
	struct fo_group *cfg;
	__u32 group, *active;

	if (!dev || dev->role == FO_ROLE_MASTER || dev->role >= FO_NSLOTS ||
	    dev->group >= FO_MAX_GROUPS)	/* slot = role: bounded */
		return FO_RX_NOT_OURS;
	group = dev->group;
	cfg = fo_group.lookup(&group);
	if (!cfg || !cfg->master_ifindex)
		return FO_RX_NOT_OURS;
	rx->group = group;
	rx->slot = dev->role;
	rx->master_ifindex = cfg->master_ifindex;
	if (src_hi == cfg->mac_hi && src_lo == cfg->mac_lo)
		return FO_RX_LOOP;
	if (cfg->flags & FO_F_INACTIVE_RX_DROP) {
		/* net_failover/bonding: nothing from the inactive lower, so a
		 * flooding switch causes no duplicates. */
		active = fo_active.lookup(&group);
		if (!active || *active != rx->slot)
			return FO_RX_DROP;
	}
	return FO_RX_UP;
}

#endif /* FO_LIB_H */
