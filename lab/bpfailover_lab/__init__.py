"""bpfailover's lab: namespaces, traffic, an agent harness.  Never imported by the product."""
