/* SPDX-License-Identifier: GPL-2.0 */
/* bpfailover: map layouts shared by the BPF programs and the Python control plane.
 *
 * This header is the single source of truth for the layouts: the Python side
 * reads them from control/bpfailover/datapath/layout_gen.py, which
 * `python -m bpfailover.datapath.layout --generate` writes from the FO_* integer
 * #defines, the index macros, the structs (plain __u32/__u64/char[N] members
 * only) and the map declarations below; a test checks it is current.  Map
 * declarations live under FO_BPF_PROG, which only the BPF build defines.
 */
#ifndef FO_FAILOVER_H
#define FO_FAILOVER_H

/* Bumped whenever a layout below changes: a pinned datapath with another ABI
 * is not adopted (a restart would read it wrongly). */
#define FO_ABI_VERSION 5

#define FO_MAX_GROUPS 64
#define FO_MAX_DEVS 1024

/* Slots of a group.  The active lower of a group is one u32 slot number in
 * fo_active: the flip is one map update of that 4-byte element, which the fast
 * path reads with one load (the old slot or the new, never a mix), and a
 * hot-plugged primary gets its new ifindex written into its (inactive) slot
 * before the flip makes it active. */
#define FO_SLOT_NONE 0
#define FO_SLOT_STANDBY 1
#define FO_SLOT_PRIMARY 2
#define FO_NSLOTS 3

/* Role of a netdev in fo_dev. */
#define FO_ROLE_MASTER 0
#define FO_ROLE_STANDBY FO_SLOT_STANDBY
#define FO_ROLE_PRIMARY FO_SLOT_PRIMARY

#define FO_DIR_TX 0
#define FO_DIR_RX 1
#define FO_NDIRS 2

/* Drop reasons: the Python side names them by these names, lower-case. */
#define FO_DROP_NO_LOWER 0
#define FO_DROP_INACTIVE_RX 1
#define FO_DROP_LOOP 2
#define FO_NDROPS 3

/* fo_group.inactive_rx: which received frames are dropped (reason inactive_rx), config
 * `inactive_rx` by these names.  A primary is registered while its slot holds an ifindex
 * (the agent clears it on unregister) that the per-packet lower check does not find gone. */
#define FO_IRX_DELIVER 0	/* none */
#define FO_IRX_DROP_STANDBY 1	/* net_failover: the standby's, while a primary is registered */
#define FO_IRX_DROP_INACTIVE 2	/* bonding: whichever lower is not the active one */

/* fo_group.flags */
/* The agent alone moves this group's traffic (downdelay_ms > 0: the operator asked to
 * wait): the datapath does not fall back on its own. */
#define FO_F_DP_HOLD 2
/* Bits 8-9: the slot whose peers were last told of it (GARP/NA).  Only the agent reads
 * them: one that adopts a datapath whose active slot was never told (its agent died
 * between the flip and the notification) tells the peers; any other restart sends nothing. */
#define FO_F_TOLD_SHIFT 8
#define FO_F_TOLD_MASK (3 << FO_F_TOLD_SHIFT)

/* fo_meta indexes. */
#define FO_META_ABI 0
#define FO_META_DP_CHECK 1
#define FO_NMETA 2

/* fo_meta[FO_META_DP_CHECK]: the per-packet lower check (net_failover's
 * netif_running && netif_carrier_ok in the datapath itself). */
#define FO_DPC_OFF 0		/* not compiled in: no kernel BTF, or it lacks a member */
#define FO_DPC_ON 1
#define FO_DPC_REFUSED 2	/* the verifier refused the checking programs */
#define FO_DPC_PROBE_FAILED 3	/* the load-time probe read wrong values */
#define FO_DPC_MISMATCH 4	/* a packet's device read back another ifindex: disabled */

/* Hooks, the index of fo_drops' hook dimension. */
#define FO_HOOK_TC_EGRESS 0
#define FO_HOOK_TC_INGRESS 1
#define FO_HOOK_XDP 2
#define FO_NHOOKS 3

/* fo_dev: ifindex -> what that netdev is to us. */
struct fo_dev {
	__u32 group;
	__u32 role;
};

/* fo_group: per-group configuration, written by the agent at set-up.  The fast
 * path reads master_ifindex, flags, inactive_rx and the MAC; the rest is the agent's own state kept
 * here so that a restarted agent adopts it from the pins. */
struct fo_group {
	__u32 master_ifindex;
	__u32 flags;
	__u32 inactive_rx;	/* FO_IRX_* */
	__u32 peer_ifindex;
	__u32 override_slot;
	char name[16];
	/* The group MAC as the first four and last two bytes loaded from a frame (host
	 * order): a frame from a lower with our own source MAC is one we sent that a
	 * switch flooded back (drop reason "loop"). */
	__u32 mac_hi;
	__u32 mac_lo;
};

struct fo_counter {
	__u64 packets;
	__u64 bytes;
};

/* Index helpers: flat arrays instead of hashes, so lookups are inlined. */
#define FO_LOWER_IDX(group, slot) ((group) * FO_NSLOTS + (slot))
#define FO_STATS_IDX(group, slot, dir) (((group) * FO_NSLOTS + (slot)) * FO_NDIRS + (dir))
#define FO_DROPS_IDX(group, hook, reason) (((group) * FO_NHOOKS + (hook)) * FO_NDROPS + (reason))

#define FO_NLOWERS (FO_MAX_GROUPS * FO_NSLOTS)
#define FO_NSTATS (FO_MAX_GROUPS * FO_NSLOTS * FO_NDIRS)
#define FO_NDROP_SLOTS (FO_MAX_GROUPS * FO_NHOOKS * FO_NDROPS)

#ifdef FO_BPF_PROG
/* bcc map declarations: name, key, value, size.  Pinned by the loader under
 * the configured bpffs directory with these same names. */
BPF_TABLE("array", __u32, __u32, fo_meta, FO_NMETA);     /* FO_META_* */
BPF_TABLE("hash", __u32, struct fo_dev, fo_dev, FO_MAX_DEVS);
BPF_TABLE("array", __u32, struct fo_group, fo_group, FO_MAX_GROUPS);
BPF_TABLE("array", __u32, __u32, fo_active, FO_MAX_GROUPS);
BPF_TABLE("array", __u32, __u32, fo_lower, FO_NLOWERS);
BPF_TABLE("percpu_array", __u32, struct fo_counter, fo_stats, FO_NSTATS);
BPF_TABLE("percpu_array", __u32, struct fo_counter, fo_drops, FO_NDROP_SLOTS);
/* Packets the datapath moved on its own, at FO_STATS_IDX(group, the dead lower's slot, dir):
 * tx sent through the other lower while the active one is dead, rx delivered from the other
 * lower although inactive_rx would drop it (drop_inactive: the active lower dead;
 * drop_standby: the primary gone). */
BPF_TABLE("percpu_array", __u32, struct fo_counter, fo_fallback, FO_NSTATS);
/* The agent's doorbell: a group id each time an IGMP/MLD message leaves its failover
 * device (its address lists changed).  Never read, only drained (datapath/doorbell.py). */
BPF_RINGBUF_OUTPUT(fo_events, 1);
/* XDP receive path: group -> hidden veth peer of the failover device. */
BPF_DEVMAP(fo_xdp_up, FO_MAX_GROUPS);
#ifdef FO_TEST_HOOKS
/* Test builds only: the last redirect target, for BPF_PROG_TEST_RUN checks. */
BPF_TABLE("array", __u32, __u32, fo_last_redirect, 1);
#endif
#endif /* FO_BPF_PROG */

#endif /* FO_FAILOVER_H */
