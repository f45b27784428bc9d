"""bpfailover: net_failover semantics as an eBPF datapath with a Python agent."""

__version__ = "0.1.0"
