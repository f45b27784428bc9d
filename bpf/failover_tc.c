/* SPDX-License-Identifier: GPL-2.0 */
/* bpfailover TC programs (clsact, direct-action): thin entry points over fo_rules.h.
 *   fo_egress     - what the failover device transmits: out through the active lower.
 *                   Attached to its hidden peer's clsact ingress (tx_path veth: veth
 *                   counts it, taps and a root qdisc see it) or to its own clsact egress
 *                   (tx_path direct).  The peer is in fo_dev as the group's master too.
 *   lower_ingress - ingress of each lower: up into the failover device through its hidden
 *                   peer's transmit (so veth counts it).
 *   fo_dp_probe   - load-time only (never attached): reads back the BTF offsets.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#define FO_BPF_PROG 1
#include "fo_rules.h"

/* An action as a TC return code (the TC half of cilium's ctx/skb.h idea). */
static __always_inline int fo_tc_ret(struct __sk_buff *skb, struct fo_action *a)
{
	switch (a->act) {
	case FO_ACT_TX:
		fo_count_sent(a, FO_DIR_TX, skb->len);
		return bpf_redirect(a->ifindex, 0);
	case FO_ACT_UP:
		fo_count_sent(a, FO_DIR_RX, skb->len);
		return bpf_redirect(a->ifindex, 0);
	case FO_ACT_DROP:
		return TC_ACT_SHOT;
	default:
		return TC_ACT_OK;
	}
}

int fo_egress(struct __sk_buff *skb)
{
	struct fo_action a = {};

	fo_tx_action(skb, &a);
	return fo_tc_ret(skb, &a);
}

int lower_ingress(struct __sk_buff *skb)
{
	struct fo_action a = {};

	fo_rx_action(FO_HOOK_TC_INGRESS, skb, &a);
	return fo_tc_ret(skb, &a);
}

#ifdef FO_DP_CHECK
/* Run once by the loader through BPF_PROG_TEST_RUN (skb on the loopback device): bit 0 the
 * ifindex read through skb->dev is skb->ifindex, bit 1 the netns walk finds that same
 * device, bits 2/3 its START/NOCARRIER state bits (checked against the device's flags). */
int fo_dp_probe(struct __sk_buff *skb)
{
	void *dev = 0, *net, *found;
	unsigned long state = 0;
	int complete = 0, ret = 0;

	if (bpf_probe_read_kernel(&dev, sizeof(dev), (void *)skb + FO_OFF_SKB_DEV) || !dev)
		return 0;
	net = fo_dev_net(dev, skb->ifindex);
	if (!net)
		return 0;
	ret |= 1;
	found = fo_dev_by_index(net, skb->ifindex, &state, &complete);
	if (found != dev)
		return ret;
	ret |= 2;
	if (state & (1UL << FO_BIT_LINK_START))
		ret |= 4;
	if (state & (1UL << FO_BIT_LINK_NOCARRIER))
		ret |= 8;
	return ret;
}

/* The same for XDP's context (xdp_buff->rxq->dev): bit 0 only. */
int fo_dp_probe_xdp(struct xdp_md *ctx)
{
	return fo_xdp_net(ctx) ? 1 : 0;
}
#endif
