/* SPDX-License-Identifier: GPL-2.0 */
/* bpfailover: the logic both hooks share.  The program files are thin entry
 * points over these inlined workers (one place for the rules, as in cilium's
 * bpf/lib). */
#ifndef FO_LIB_H
#define FO_LIB_H

#include "failover.h"

/* bcc decides from /proc/kallsyms whether the kernel has bpf_probe_read_kernel(), and
 * #defines it to bpf_probe_read() (which TC and XDP programs may not call) when it cannot
 * see the symbol: what happens without CAP_SYSLOG, e.g. under the shipped unit's
 * ProtectKernelLogs=yes, and the per-packet lower check was refused.  The helper is older
 * (5.5) than anything else this datapath needs: call it by its number. */
#undef bpf_probe_read_kernel
static long (*fo_probe_read_kernel)(void *dst, __u32 size, const void *unsafe_ptr) =
	(void *)BPF_FUNC_probe_read_kernel;
#define bpf_probe_read_kernel fo_probe_read_kernel

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

/* Transmit: the group's active slot (FO_SLOT_NONE if none) and its lower's ifindex (0 when
 * the slot has no lower).  The active slot is read once; the slot's ifindex is only ever
 * rewritten by the agent while that slot is inactive. */
static __always_inline __u32 fo_tx_target(__u32 group, __u32 *slot_out)
{
	__u32 *active = fo_active.lookup(&group);
	__u32 slot, idx, *ifindex;

	*slot_out = FO_SLOT_NONE;
	if (!active)
		return 0;
	slot = *active;
	if (slot == FO_SLOT_NONE || slot >= FO_NSLOTS)
		return 0;
	*slot_out = slot;
	idx = FO_LOWER_IDX(group, slot);
	ifindex = fo_lower.lookup(&idx);
	return ifindex ? *ifindex : 0;
}

static __always_inline __u32 fo_slot_lower(__u32 group, __u32 slot)
{
	__u32 idx = FO_LOWER_IDX(group, slot);
	__u32 *ifindex = fo_lower.lookup(&idx);

	return ifindex ? *ifindex : 0;
}

enum fo_rx_verdict {
	FO_RX_NOT_OURS = 0,	/* not a registered lower: leave the frame alone */
	FO_RX_UP,		/* deliver to the failover device */
	FO_RX_DROP,		/* dropped by the group's inactive_rx rule */
	FO_RX_LOOP,		/* our own frame, flooded back by the switch: drop */
};

struct fo_rx {
	__u32 group;
	__u32 slot;
	__u32 rule;		/* the group's inactive_rx (FO_IRX_*) */
	__u32 up_ifindex;	/* where a frame goes up: the hidden peer (or the device) */
	__u32 up_flags;		/* bpf_redirect() flags for it */
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
	/* Up through the hidden peer's transmit: veth counts it (the failover device's rx,
	 * the peer's tx) and delivers it into the failover device like any frame it
	 * receives.  A group without a peer (none is ever written so) goes straight in. */
	if (cfg->peer_ifindex) {
		rx->up_ifindex = cfg->peer_ifindex;
		rx->up_flags = 0;
	} else {
		rx->up_ifindex = cfg->master_ifindex;
		rx->up_flags = BPF_F_INGRESS;
	}
	if (src_hi == cfg->mac_hi && src_lo == cfg->mac_lo)
		return FO_RX_LOOP;
	rx->rule = cfg->inactive_rx;
	if (rx->rule == FO_IRX_DROP_INACTIVE) {
		/* bonding: nothing from the lower that is not active, so a flooding switch
		 * causes no duplicates. */
		active = fo_active.lookup(&group);
		if (!active || *active != rx->slot)
			return FO_RX_DROP;
	} else if (rx->rule == FO_IRX_DROP_STANDBY) {
		/* net_failover_handle_frame(): the standby's frames only while no primary is
		 * registered, whichever lower is active; the primary's always. */
		if (rx->slot == FO_SLOT_STANDBY && fo_slot_lower(group, FO_SLOT_PRIMARY))
			return FO_RX_DROP;
	}
	return FO_RX_UP;
}

/* ---- the per-packet lower check (net_failover's netif_running && netif_carrier_ok) ----
 * Compiled in when the loader found the running kernel's layouts in its BTF (FO_OFF_*,
 * FO_BIT_LINK_*: -D flags), and active while fo_meta[FO_META_DP_CHECK] is FO_DPC_ON.  No
 * kernel pointer is ever stored: a lower is found by ifindex in the packet's own netns each
 * time, the way dev_get_by_index_rcu() does (TC programs run under RCU), and every read
 * goes through bpf_probe_read_kernel(), which cannot fault. */
enum fo_link {
	FO_LINK_UNKNOWN = 0,	/* could not tell: behave as without the check */
	FO_LINK_GONE,		/* no such ifindex in the netns (unplugged) */
	FO_LINK_DEAD,		/* not running, or no carrier */
	FO_LINK_UP,
};

#ifdef FO_DP_CHECK
#define FO_WALK_MAX 16		/* entries of one dev_index_head bucket looked at */

static __always_inline void fo_dpc_set(__u32 state)
{
	__u32 key = FO_META_DP_CHECK;
	__u32 *v = fo_meta.lookup(&key);

	if (v)
		*v = state;
}

/* The check is compiled in and on. */
static __always_inline int fo_dpc_on(void)
{
	__u32 key = FO_META_DP_CHECK;
	__u32 *on = fo_meta.lookup(&key);

	return on && *on == FO_DPC_ON;
}

/* Two fields of one kernel struct in one bpf_probe_read_kernel() when they lie within
 * FO_WIN_MAX bytes (-D, from datapath/btf.py): a read's cost is mostly the helper's fixed
 * ~20 ns, not its bytes.  The window starts 8-aligned so that each field keeps its natural
 * alignment on the stack (the verifier wants aligned stack reads).  Offsets are this
 * kernel's (-D flags): one read or two is decided at compile time. */
#define FO_MIN(a, b) ((a) < (b) ? (a) : (b))
#define FO_MAX(a, b) ((a) > (b) ? (a) : (b))
#define FO_WIN_LO(a, b) (FO_MIN(a, b) & ~7)
#define FO_WIN_LEN(a, asz, b, bsz) (FO_MAX((a) + (asz), (b) + (bsz)) - FO_WIN_LO(a, b))
#define FO_WIN_AT(w, lo, off, type) (*(type *)((char *)(w) + (off) - (lo)))

/* net_device: ifindex and nd_net (the device of a packet) */
#define FO_DEVW_LO FO_WIN_LO(FO_OFF_DEV_IFINDEX, FO_OFF_DEV_NET)
#define FO_DEVW_LEN FO_WIN_LEN(FO_OFF_DEV_IFINDEX, 4, FO_OFF_DEV_NET, 8)
/* net_device: ifindex and state (a lower found in the bucket walk) */
#define FO_LOWW_LO FO_WIN_LO(FO_OFF_DEV_IFINDEX, FO_OFF_DEV_STATE)
#define FO_LOWW_LEN FO_WIN_LEN(FO_OFF_DEV_IFINDEX, 4, FO_OFF_DEV_STATE, 8)

static __always_inline int fo_read_ifindex_net(void *dev, int *ifindex, void **net)
{
#if FO_DEVW_LEN <= FO_WIN_MAX
	__u64 w[(FO_DEVW_LEN + 7) / 8];

	if (bpf_probe_read_kernel(w, sizeof(w), dev + FO_DEVW_LO))
		return -1;
	*ifindex = FO_WIN_AT(w, FO_DEVW_LO, FO_OFF_DEV_IFINDEX, int);
	*net = FO_WIN_AT(w, FO_DEVW_LO, FO_OFF_DEV_NET, void *);
	return 0;
#else
	if (bpf_probe_read_kernel(ifindex, sizeof(*ifindex), dev + FO_OFF_DEV_IFINDEX))
		return -1;
	return bpf_probe_read_kernel(net, sizeof(*net), dev + FO_OFF_DEV_NET) ? -1 : 0;
#endif
}

static __always_inline int fo_read_ifindex_state(void *dev, int *ifindex, unsigned long *state)
{
#if FO_LOWW_LEN <= FO_WIN_MAX
	__u64 w[(FO_LOWW_LEN + 7) / 8];

	if (bpf_probe_read_kernel(w, sizeof(w), dev + FO_LOWW_LO))
		return -1;
	*ifindex = FO_WIN_AT(w, FO_LOWW_LO, FO_OFF_DEV_IFINDEX, int);
	*state = FO_WIN_AT(w, FO_LOWW_LO, FO_OFF_DEV_STATE, unsigned long);
	return 0;
#else
	if (bpf_probe_read_kernel(ifindex, sizeof(*ifindex), dev + FO_OFF_DEV_IFINDEX))
		return -1;
	return bpf_probe_read_kernel(state, sizeof(*state), dev + FO_OFF_DEV_STATE) ? -1 : 0;
#endif
}

/* The netns of netdev `dev` whose ifindex must be `want`, else the offsets are not this
 * kernel's and the check turns itself off for good (FO_DPC_MISMATCH). */
static __always_inline void *fo_dev_net(void *dev, __u32 want)
{
	void *net = 0;
	int ifindex = 0;

	if (!dev || fo_read_ifindex_net(dev, &ifindex, &net))
		return 0;
	if ((__u32)ifindex != want) {
		fo_dpc_set(FO_DPC_MISMATCH);
		return 0;
	}
	return net;
}

/* The netns of skb->dev (the packet's device is alive while the program runs). */
static __always_inline void *fo_skb_net(struct __sk_buff *skb)
{
	void *dev = 0;

	if (bpf_probe_read_kernel(&dev, sizeof(dev), (void *)skb + FO_OFF_SKB_DEV))
		return 0;
	return fo_dev_net(dev, skb->ifindex);
}

/* The same for the receiving netdev of an XDP context (xdp_buff->rxq->dev). */
static __always_inline void *fo_xdp_net(struct xdp_md *ctx)
{
	void *rxq = 0, *dev = 0;

	if (bpf_probe_read_kernel(&rxq, sizeof(rxq), (void *)ctx + FO_OFF_XDP_RXQ) || !rxq)
		return 0;
	if (bpf_probe_read_kernel(&dev, sizeof(dev), rxq + FO_OFF_RXQ_DEV))
		return 0;
	return fo_dev_net(dev, ctx->ingress_ifindex);
}

/* The netdev `ifindex` in netns `net` and its state; *complete says the bucket was walked
 * to its end (a miss then means there is no such device). */
static __always_inline void *fo_dev_by_index(void *net, __u32 ifindex, unsigned long *state,
					     int *complete)
{
	void *head = 0, *node = 0, *cand;
	__u32 bucket = ifindex & ((1U << FO_NETDEV_HASHBITS) - 1);
	int idx, i;

	*complete = 0;
	if (!net)
		return 0;
	if (bpf_probe_read_kernel(&head, sizeof(head), net + FO_OFF_NET_INDEX_HEAD) || !head)
		return 0;
	if (bpf_probe_read_kernel(&node, sizeof(node), head + bucket * sizeof(void *)))
		return 0;
#pragma unroll
	for (i = 0; i < FO_WALK_MAX; i++) {
		if (!node) {
			*complete = 1;
			return 0;
		}
		cand = node - FO_OFF_DEV_INDEX_HLIST;
		if (fo_read_ifindex_state(cand, &idx, state))
			return 0;
		if ((__u32)idx == ifindex) {
			*complete = 1;
			return cand;
		}
		if (bpf_probe_read_kernel(&node, sizeof(node), node))	/* hlist_node.next */
			return 0;
	}
	return 0;
}

static __always_inline int fo_link(void *net, __u32 ifindex)
{
	unsigned long state = 0;
	int complete = 0;

	if (!ifindex)
		return FO_LINK_GONE;
	if (!fo_dev_by_index(net, ifindex, &state, &complete))
		return complete ? FO_LINK_GONE : FO_LINK_UNKNOWN;
	if (!(state & (1UL << FO_BIT_LINK_START)) || (state & (1UL << FO_BIT_LINK_NOCARRIER)))
		return FO_LINK_DEAD;
	return FO_LINK_UP;
}
#else
static __always_inline int fo_dpc_on(void) { return 0; }
static __always_inline void *fo_skb_net(struct __sk_buff *skb) { return 0; }
static __always_inline void *fo_xdp_net(struct xdp_md *ctx) { return 0; }
static __always_inline int fo_link(void *net, __u32 ifindex) { return FO_LINK_UNKNOWN; }
#endif /* FO_DP_CHECK */

/* FO_F_DP_HOLD (downdelay_ms > 0): the agent alone moves this group's traffic. */
static __always_inline int fo_dp_hold(__u32 group)
{
	struct fo_group *cfg = fo_group.lookup(&group);

	return !cfg || (cfg->flags & FO_F_DP_HOLD);
}

/* The datapath may move the group's traffic on its own. */
static __always_inline int fo_dpc_applies(__u32 group)
{
	return fo_dpc_on() && !fo_dp_hold(group);
}

static __always_inline void fo_count_fallback(__u32 group, __u32 from_slot, __u32 dir,
					      __u64 bytes)
{
	__u32 idx = FO_STATS_IDX(group, from_slot, dir);
	struct fo_counter *c = fo_fallback.lookup(&idx);

	if (c) {
		c->packets++;
		c->bytes += bytes;
	}
}

/* ---- verdicts to actions: what an entry point does with a frame, whatever its hook.
 * Each program file maps an action to its own return codes (as cilium's ctx/skb.h and
 * ctx/xdp.h map CTX_ACT_*); the rules and the counting of drops and fallbacks live here. */
enum fo_act {
	FO_ACT_PASS = 0,	/* not ours: the stack carries on */
	FO_ACT_DROP,		/* dropped, already counted by reason */
	FO_ACT_TX,		/* out through lower `ifindex` (slot `slot`) */
	FO_ACT_UP,		/* up into the failover device `ifindex` (from slot `slot`) */
};

struct fo_action {
	__u32 act;
	__u32 group;
	__u32 slot;
	__u32 ifindex;
	__u32 flags;		/* FO_ACT_UP: the bpf_redirect() flags */
	__u32 fallback_from;	/* the dead active slot when the datapath moved it, else 0 */
};

/* An IGMP or MLD message leaving the failover device: its address lists have just changed
 * (the kernel adds/removes the link-layer group before it reports a join/leave), so ring
 * the agent's doorbell to sync them onto the lowers.  MLD always travels with a hop-by-hop
 * header (router alert), which ordinary traffic does not carry: one byte to compare. */
static __always_inline int fo_is_mc_report(struct __sk_buff *skb)
{
	__u8 *p = (__u8 *)(long)skb->data;

	if ((void *)(p + 14 + 10) > (void *)(long)skb->data_end)
		return 0;
	if (p[12] == 0x08 && p[13] == 0x00)		/* IPv4 */
		return p[14 + 9] == 2;			/* protocol IGMP */
	if (p[12] == 0x86 && p[13] == 0xdd)		/* IPv6 */
		return p[14 + 6] == 0;			/* next header: hop-by-hop */
	return 0;
}

static __always_inline void fo_ring(__u32 group)
{
	fo_events.ringbuf_output(&group, sizeof(group), BPF_RB_FORCE_WAKEUP);
}

/* Transmit from failover device skb->ifindex. */
static __always_inline void fo_tx_action(struct __sk_buff *skb, struct fo_action *a)
{
	__u32 ifindex = skb->ifindex;
	struct fo_dev *dev = fo_dev.lookup(&ifindex);
	__u32 group, slot, target, other, oif;
	void *net;
	int st, hold;

	a->act = FO_ACT_PASS;
	if (!dev || dev->role != FO_ROLE_MASTER || dev->group >= FO_MAX_GROUPS)
		return;		/* not a failover device we know: hands off */
	group = dev->group;
	a->group = group;
	if (fo_is_mc_report(skb))
		fo_ring(group);
	target = fo_tx_target(group, &slot);
	if (slot != FO_SLOT_NONE && fo_dpc_on()) {
		net = fo_skb_net(skb);
		st = net ? fo_link(net, target) : FO_LINK_UNKNOWN;
		if (st == FO_LINK_DEAD || st == FO_LINK_GONE) {
			hold = fo_dp_hold(group);
			other = FO_SLOT_STANDBY + FO_SLOT_PRIMARY - slot;
			oif = hold ? 0 : fo_slot_lower(group, other);
			if (oif && fo_link(net, oif) == FO_LINK_UP) {
				a->fallback_from = slot;
				a->act = FO_ACT_TX;
				a->slot = other;
				a->ifindex = oif;
				return;
			}
			/* Neither lower can carry it.  Held, a dead lower is the agent's
			 * choice and stands; a gone one's stale ifindex is no target
			 * either way (the redirect would be lost, counted as sent). */
			if (!hold || st == FO_LINK_GONE)
				target = 0;
		}
	}
	if (!target) {
		fo_count_drop(group, FO_HOOK_TC_EGRESS, FO_DROP_NO_LOWER, skb->len);
		a->act = FO_ACT_DROP;
		return;
	}
	a->act = FO_ACT_TX;
	a->slot = slot;
	a->ifindex = target;
}

/* A frame the group's inactive_rx rule drops is delivered all the same when the per-packet
 * check sees what the agent has not acted on yet; returns the slot of the dead lower it
 * stands in for (fo_fallback), else 0.  drop_inactive: the active lower is dead (the other
 * one is all there is), unless the group is held.  drop_standby: the primary is gone
 * (net_failover unregisters an unplugged primary at once; the agent too, whatever
 * downdelay says), held or not.  A primary present without carrier stays registered. */
static __always_inline __u32 fo_rx_rescue(struct fo_rx *rx, struct __sk_buff *skb,
					  struct xdp_md *xdp)
{
	void *net;
	__u32 slot;
	int st;

	if (rx->rule == FO_IRX_DROP_STANDBY) {
		if (!fo_dpc_on())
			return 0;
		slot = FO_SLOT_PRIMARY;
	} else {
		if (!fo_dpc_applies(rx->group))
			return 0;
		fo_tx_target(rx->group, &slot);
		if (slot == FO_SLOT_NONE || slot == rx->slot)
			return 0;
	}
	net = skb ? fo_skb_net(skb) : fo_xdp_net(xdp);
	if (!net)
		return 0;
	st = fo_link(net, fo_slot_lower(rx->group, slot));
	if (st == FO_LINK_GONE || (st == FO_LINK_DEAD && rx->rule != FO_IRX_DROP_STANDBY))
		return slot;
	return 0;
}

/* Receive on lower `ifindex`: from TC (`skb`) or XDP (`xdp`), the other one 0. */
static __always_inline void fo_rx_action(__u32 hook, __u32 ifindex, void *data, void *data_end,
					 struct __sk_buff *skb, struct xdp_md *xdp, __u64 len,
					 struct fo_action *a)
{
	struct fo_rx rx = {};
	__u32 src_hi, src_lo;

	fo_eth_src(data, data_end, &src_hi, &src_lo);
	a->act = FO_ACT_PASS;
	switch (fo_rx_decide(ifindex, src_hi, src_lo, &rx)) {
	case FO_RX_UP:
		break;
	case FO_RX_DROP:
		a->fallback_from = fo_rx_rescue(&rx, skb, xdp);
		if (a->fallback_from)
			break;
		fo_count_drop(rx.group, hook, FO_DROP_INACTIVE_RX, len);
		a->act = FO_ACT_DROP;
		return;
	case FO_RX_LOOP:
		fo_count_drop(rx.group, hook, FO_DROP_LOOP, len);
		a->act = FO_ACT_DROP;
		return;
	default:
		return;
	}
	a->act = FO_ACT_UP;
	a->group = rx.group;
	a->slot = rx.slot;
	a->ifindex = rx.up_ifindex;
	a->flags = rx.up_flags;
}

#endif /* FO_LIB_H */
