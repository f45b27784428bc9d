/* SPDX-License-Identifier: GPL-2.0 */
/* bpfailover TC programs (clsact, direct-action).
 *   fo_egress     - egress of the failover device: out through the active lower.
 *   lower_ingress - ingress of each lower: up into the failover device.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#define FO_BPF_PROG 1
#include "fo_lib.h"

int fo_egress(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct fo_dev *dev = fo_dev.lookup(&ifindex);
	__u32 group, slot = FO_SLOT_NONE, target;

	if (!dev || dev->role != FO_ROLE_MASTER || dev->group >= FO_MAX_GROUPS)
		return TC_ACT_OK;	/* not a failover device we know: hands off */
	group = dev->group;
	target = fo_tx_target(group, &slot);
	if (!target) {
		fo_count_drop(group, FO_HOOK_TC_EGRESS, FO_DROP_NO_LOWER, skb->len);
		return TC_ACT_SHOT;
	}
	fo_count(FO_STATS_IDX(group, slot, FO_DIR_TX), skb->len);
	fo_note_redirect(target);
	return bpf_redirect(target, 0);
}

int lower_ingress(struct __sk_buff *skb)
{
	struct fo_rx rx = {};
	__u32 src_hi, src_lo;

	fo_eth_src((void *)(long)skb->data, (void *)(long)skb->data_end, &src_hi, &src_lo);
	switch (fo_rx_decide(skb->ifindex, src_hi, src_lo, &rx)) {
	case FO_RX_UP:
		fo_count(FO_STATS_IDX(rx.group, rx.slot, FO_DIR_RX), skb->len);
		fo_note_redirect(rx.master_ifindex);
		return bpf_redirect(rx.master_ifindex, BPF_F_INGRESS);
	case FO_RX_DROP:
		fo_count_drop(rx.group, FO_HOOK_TC_INGRESS, FO_DROP_INACTIVE_RX, skb->len);
		return TC_ACT_SHOT;
	case FO_RX_LOOP:
		fo_count_drop(rx.group, FO_HOOK_TC_INGRESS, FO_DROP_LOOP, skb->len);
		return TC_ACT_SHOT;
	default:
		return TC_ACT_OK;
	}
}
