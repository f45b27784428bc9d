/* SPDX-License-Identifier: GPL-2.0 */
/* bpfailover: the per-packet lower check (net_failover's netif_running &&
 * netif_carrier_ok), read from the kernel's own structs.
 *
 * Compiled in when the loader found the running kernel's layouts in its BTF (FO_OFF_*,
 * FO_BIT_LINK_*, FO_WIN_MAX: -D flags from datapath/btf.py), and active while
 * fo_meta[FO_META_DP_CHECK] is FO_DPC_ON.  No kernel pointer is ever stored: a lower is
 * found by ifindex in the packet's own netns each time, the way dev_get_by_index_rcu()
 * does (TC programs run under RCU), and every read goes through bpf_probe_read_kernel(),
 * which cannot fault.  Without FO_DP_CHECK the same names are stubs that say "unknown". */
#ifndef FO_KERN_H
#define FO_KERN_H

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

/* The netns of the packet's device, from either hook's context (FO_HOOK_XDP: an xdp_md,
 * else an __sk_buff); the hook is a constant at every call, so one branch is compiled. */
static __always_inline void *fo_ctx_net(__u32 hook, void *ctx)
{
	return hook == FO_HOOK_XDP ? fo_xdp_net(ctx) : fo_skb_net(ctx);
}

#endif /* FO_KERN_H */
