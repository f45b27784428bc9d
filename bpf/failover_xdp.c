/* SPDX-License-Identifier: GPL-2.0 */
/* bpfailover XDP receive fast path on the lowers.
 *
 * XDP_REDIRECT always transmits on the target, so a frame is sent into the
 * failover device's hidden veth peer and enters the failover device through
 * veth's own receive path (where a user's XDP program on it runs natively).
 * Anything we cannot redirect here is passed on to lower_ingress at TC. */
#include <uapi/linux/bpf.h>

#define FO_BPF_PROG 1
#include "fo_lib.h"

int xdp_lower_rx(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 len = data_end - data;
	struct fo_rx rx = {};
	__u32 src_hi, src_lo;
	int verdict;

	fo_eth_src(data, data_end, &src_hi, &src_lo);
	switch (fo_rx_decide(ctx->ingress_ifindex, src_hi, src_lo, &rx)) {
	case FO_RX_UP:
		/* Falls back to XDP_PASS (the TC path) when the group has no
		 * devmap entry yet. */
		verdict = fo_xdp_up.redirect_map(rx.group, XDP_PASS);
		if (verdict == XDP_REDIRECT) {
			fo_count(FO_STATS_IDX(rx.group, rx.slot, FO_DIR_RX), len);
			fo_note_redirect(rx.master_ifindex);
		}
		return verdict;
	case FO_RX_DROP:
		fo_count_drop(rx.group, FO_HOOK_XDP, FO_DROP_INACTIVE_RX, len);
		return XDP_DROP;
	case FO_RX_LOOP:
		fo_count_drop(rx.group, FO_HOOK_XDP, FO_DROP_LOOP, len);
		return XDP_DROP;
	default:
		return XDP_PASS;
	}
}
