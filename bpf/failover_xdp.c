/* SPDX-License-Identifier: GPL-2.0 */
/* bpfailover XDP receive fast path on the lowers: a thin entry point over fo_rules.h.
 *
 * XDP_REDIRECT always transmits on the target, so a frame is sent into the
 * failover device's hidden veth peer and enters the failover device through
 * veth's own receive path (where a user's XDP program on it runs natively).
 * Anything we cannot redirect here is passed on to lower_ingress at TC. */
#include <uapi/linux/bpf.h>

#define FO_BPF_PROG 1
#include "fo_rules.h"

/* An action as an XDP return code (the XDP half of cilium's ctx/xdp.h idea). */
static __always_inline int fo_xdp_ret(struct fo_action *a, __u64 len)
{
	int verdict;

	switch (a->act) {
	case FO_ACT_UP:
		/* Falls back to XDP_PASS (the TC path) when the group has no
		 * devmap entry yet. */
		verdict = fo_xdp_up.redirect_map(a->group, XDP_PASS);
		if (verdict == XDP_REDIRECT)
			fo_count_sent(a, FO_DIR_RX, len);
		return verdict;
	case FO_ACT_DROP:
		return XDP_DROP;
	default:
		return XDP_PASS;
	}
}

int xdp_lower_rx(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 len = data_end - data;
	struct fo_action a = {};

	fo_rx_action(FO_HOOK_XDP, ctx, &a);
	return fo_xdp_ret(&a, len);
}
