/* SPDX-License-Identifier: GPL-2.0 */
/* bpfailover: the rules both hooks share (where a frame goes, what is dropped and why, what
 * is counted).  The program files are thin entry points over these inlined workers (one
 * place for the rules, as in cilium's bpf/lib); the kernel-struct reads of the per-packet
 * lower check are fo_kern.h's. */
#ifndef FO_RULES_H
#define FO_RULES_H

#include <uapi/linux/if_ether.h>

#include "failover.h"
#include "fo_kern.h"

/* The counter maps, for fo_count(). */
enum fo_ctr {
	FO_CTR_STATS,		/* fo_stats, at FO_STATS_IDX */
	FO_CTR_FALLBACK,	/* fo_fallback, at FO_STATS_IDX */
	FO_CTR_DROPS,		/* fo_drops, at FO_DROPS_IDX */
};

/* One packet of `bytes` onto counter `idx` of map `ctr` (a constant at every call: one
 * lookup is compiled).  Per-CPU slots: no atomics needed. */
static __always_inline void fo_count(__u32 ctr, __u32 idx, __u64 bytes)
{
	struct fo_counter *c;

	if (ctr == FO_CTR_DROPS)
		c = fo_drops.lookup(&idx);
	else if (ctr == FO_CTR_FALLBACK)
		c = fo_fallback.lookup(&idx);
	else
		c = fo_stats.lookup(&idx);
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
	__u32 up_ifindex;	/* where a frame goes up: the failover device's hidden peer */
};

/* The source MAC of an Ethernet frame as (first 4 bytes, last 2 bytes); zeros when the
 * frame is too short to have one. */
static __always_inline void fo_eth_src(void *data, void *data_end, __u32 *hi, __u32 *lo)
{
	struct ethhdr *eth = data;
	__u16 last = 0;

	*hi = 0;
	*lo = 0;
	if (data + ETH_HLEN > data_end)
		return;
	__builtin_memcpy(hi, eth->h_source, 4);
	__builtin_memcpy(&last, eth->h_source + 4, 2);
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
	 * receives.  The agent writes the peer with the device, in one update. */
	rx->up_ifindex = cfg->peer_ifindex;
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

/* ---- verdicts to actions: what an entry point does with a frame, whatever its hook.
 * Each program file maps an action to its own return codes (as cilium's ctx/skb.h and
 * ctx/xdp.h map CTX_ACT_*); the rules and the counting of drops and fallbacks live here. */
enum fo_act {
	FO_ACT_PASS = 0,	/* not ours: the stack carries on */
	FO_ACT_DROP,		/* dropped, already counted by reason */
	FO_ACT_TX,		/* out through lower `ifindex` (slot `slot`) */
	FO_ACT_UP,		/* up into the failover device through `ifindex` (from slot `slot`) */
};

struct fo_action {
	__u32 act;
	__u32 group;
	__u32 slot;
	__u32 ifindex;
	__u32 fallback_from;	/* the dead active slot when the datapath moved it, else 0 */
};

/* A frame the entry point sends on (FO_ACT_TX: dir FO_DIR_TX, FO_ACT_UP: FO_DIR_RX): its
 * counters, and the fallback's when the datapath moved it. */
static __always_inline void fo_count_sent(struct fo_action *a, __u32 dir, __u64 bytes)
{
	if (a->fallback_from)
		fo_count(FO_CTR_FALLBACK, FO_STATS_IDX(a->group, a->fallback_from, dir), bytes);
	fo_count(FO_CTR_STATS, FO_STATS_IDX(a->group, a->slot, dir), bytes);
	fo_note_redirect(a->ifindex);
}

/* Two fields of an IP header, by their offsets in struct iphdr and struct ipv6hdr, and their
 * values: the uapi headers that declare them (linux/ip.h, ipv6.h, in.h) pull in enough of
 * the kernel's to double the datapath's compile time. */
#define FO_IP4_PROTOCOL 9	/* offsetof(struct iphdr, protocol) */
#define FO_IP6_NEXTHDR 6	/* offsetof(struct ipv6hdr, nexthdr) */
#define FO_IPPROTO_IGMP 2
#define FO_IPV6_HOPOPTS 0	/* IPPROTO_HOPOPTS: a hop-by-hop options header follows */

/* An IGMP or MLD message leaving the failover device: its address lists have just changed
 * (the kernel adds/removes the link-layer group before it reports a join/leave), so ring
 * the agent's doorbell to sync them onto the lowers.  MLD always travels with a hop-by-hop
 * header (router alert), which ordinary traffic does not carry: one byte to compare. */
static __always_inline int fo_is_mc_report(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	__u8 *l3 = data + ETH_HLEN;
	__u16 proto;

	/* one bounds check for both: IPv4's protocol lies further in than IPv6's nexthdr */
	if ((void *)(l3 + FO_IP4_PROTOCOL + 1) > (void *)(long)skb->data_end)
		return 0;
	/* one 2-byte load (struct ethhdr is packed: through it, two 1-byte loads) */
	proto = *(__u16 *)(data + offsetof(struct ethhdr, h_proto));
	if (proto == bpf_htons(ETH_P_IP))
		return l3[FO_IP4_PROTOCOL] == FO_IPPROTO_IGMP;
	if (proto == bpf_htons(ETH_P_IPV6))
		return l3[FO_IP6_NEXTHDR] == FO_IPV6_HOPOPTS;
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
		fo_count(FO_CTR_DROPS, FO_DROPS_IDX(group, FO_HOOK_TC_EGRESS, FO_DROP_NO_LOWER),
			 skb->len);
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
static __always_inline __u32 fo_rx_rescue(struct fo_rx *rx, __u32 hook, void *ctx)
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
	net = fo_ctx_net(hook, ctx);
	if (!net)
		return 0;
	st = fo_link(net, fo_slot_lower(rx->group, slot));
	if (st == FO_LINK_GONE || (st == FO_LINK_DEAD && rx->rule != FO_IRX_DROP_STANDBY))
		return slot;
	return 0;
}

/* Receive on a lower, at `hook`: its context is an xdp_md for FO_HOOK_XDP, else an
 * __sk_buff (the hook is a constant at every call: each program reads its own). */
static __always_inline void fo_rx_action(__u32 hook, void *ctx, struct fo_action *a)
{
	struct __sk_buff *skb = ctx;
	struct xdp_md *xdp = ctx;
	int is_xdp = hook == FO_HOOK_XDP;
	void *data = (void *)(long)(is_xdp ? xdp->data : skb->data);
	void *data_end = (void *)(long)(is_xdp ? xdp->data_end : skb->data_end);
	__u32 ifindex = is_xdp ? xdp->ingress_ifindex : skb->ifindex;
	__u64 len = is_xdp ? data_end - data : skb->len;
	struct fo_rx rx = {};
	__u32 src_hi, src_lo;

	fo_eth_src(data, data_end, &src_hi, &src_lo);
	a->act = FO_ACT_PASS;
	switch (fo_rx_decide(ifindex, src_hi, src_lo, &rx)) {
	case FO_RX_UP:
		break;
	case FO_RX_DROP:
		a->fallback_from = fo_rx_rescue(&rx, hook, ctx);
		if (a->fallback_from)
			break;
		fo_count(FO_CTR_DROPS, FO_DROPS_IDX(rx.group, hook, FO_DROP_INACTIVE_RX), len);
		a->act = FO_ACT_DROP;
		return;
	case FO_RX_LOOP:
		fo_count(FO_CTR_DROPS, FO_DROPS_IDX(rx.group, hook, FO_DROP_LOOP), len);
		a->act = FO_ACT_DROP;
		return;
	default:
		return;
	}
	a->act = FO_ACT_UP;
	a->group = rx.group;
	a->slot = rx.slot;
	a->ifindex = rx.up_ifindex;
}

#endif /* FO_RULES_H */
